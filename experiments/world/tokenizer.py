"""A real word-level CLIP BPE tokenizer for the world's captions: every caption word is ONE token.

The vocabulary holds every character (alone and with CLIP's end-of-word marker ``</w>``), every intermediate of a
chain of left-to-right merges per word and the word itself; ``merges.txt`` chains the merges so that BPE reduces
each word to a single token. Saved as a ``CLIPTokenizer`` directory (vocab.json, merges.txt) whose
``model_max_length`` fits the longest caption plus SOS and EOS.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation (letters, digits and punctuation runs) restricted to what the captions use
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def caption_words(captions: list[str]) -> list[str]:
    """Sorted distinct pre-tokenised words of ``captions``."""
    return sorted({w for c in captions for w in _WORD.findall(c.lower())})


def _chain(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build ``word + '</w>'`` from its characters."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def build_tokenizer(captions: list[str], directory: str | Path):
    """Write the tokenizer for ``captions`` to ``directory`` and return it loaded back (``CLIPTokenizer``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = caption_words(captions)
    chars = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        for a, b in _chain(w):
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    vocab.setdefault(SOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    longest = max(len(_WORD.findall(c.lower())) for c in captions) + 2
    for _ in range(50):  # another word's merge can fire inside a word: chain its actual pieces too, then recheck
        tok = _save(directory, vocab, merges, longest)
        bad = {w: tok.convert_ids_to_tokens(tok(w).input_ids[1:-1]) for w in words}
        bad = {w: pieces for w, pieces in bad.items() if len(pieces) != 1}
        if not bad:
            return tok
        for pieces in bad.values():
            left = pieces[0]
            for right in pieces[1:]:
                if (left, right) not in merges:
                    merges.append((left, right))
                left = left + right
                vocab.setdefault(left, len(vocab))
    check_single_tokens(tok, words)
    return tok


def _save(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int):
    from transformers import CLIPTokenizer

    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token=EOS,
                        model_max_length=max_length)
    tok.save_pretrained(directory)
    return tok


def check_single_tokens(tokenizer, words: list[str]) -> None:
    """Raise ValueError unless every word of ``words`` encodes to exactly one token between SOS and EOS."""
    bad = [w for w in words if len(tokenizer(w).input_ids) != 3]
    if bad:
        raise ValueError(f"tokenizer splits caption words into several tokens: {bad[:5]}")
