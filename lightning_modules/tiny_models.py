"""Tiny random CLIP models saved to local directories, loaded back through the real ``from_pretrained`` path.

Layout mirrors the real checkpoints: ``DIR/image_encoder`` (CLIP vision with projection + preprocessor config,
like a ViT-bigG/14 directory) and ``DIR/text_encoder_2`` + ``DIR/tokenizer_2`` (like the SDXL base directory).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def tiny_tokenizer(directory: Path) -> None:
    """A character-level CLIP BPE tokenizer (every printable character, no merges), saved to ``directory``."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=32)
    tok.save_pretrained(directory)
    (directory / "vocab.json").write_text(json.dumps(vocab))


def make_tiny_clip(out: str | Path, embed_dim: int = 32, image_size: int = 32, seed: int = 0) -> Path:
    """Write tiny random CLIP image and text towers whose targets are ``embed_dim``-wide; returns ``out``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    out = Path(out)
    torch.manual_seed(seed)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, image_size=image_size,
        patch_size=8, projection_dim=embed_dim))
    vision.save_pretrained(out / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(out / "image_encoder")
    tiny_tokenizer(out / "tokenizer_2")
    vocab = json.loads((out / "tokenizer_2" / "vocab.json").read_text())
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=embed_dim, intermediate_size=2 * embed_dim, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=32, projection_dim=embed_dim,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"]))
    text.save_pretrained(out / "text_encoder_2")
    return out
