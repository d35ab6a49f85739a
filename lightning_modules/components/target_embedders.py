"""Stage-1 target embedders, loaded from local directories only (``from_pretrained``, never a download).

Image: CLIP vision tower with projection (ViT-bigG/14 at paper scale) -> pooled projected ``image_embeds`` (D).
Text: SDXL's ``text_encoder_2`` -> penultimate hidden state at the EOS token (found with the same tokenizer),
averaged over an image's captions (D).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class MissingWeightsError(FileNotFoundError):
    """A local model directory is absent or incomplete; the message names the option to set."""


def require_model_dir(path: str | Path, option: str, needs: tuple[str, ...] = ("config.json",)) -> Path:
    """Check that ``path`` holds a saved model (``needs``), else raise naming ``option`` (no silent random model)."""
    directory = Path(path) if path else None
    if directory is None or not all((directory / n).is_file() for n in needs):
        raise MissingWeightsError(
            f"{option}: no saved model at {path!r} (expected {', '.join(needs)}). Point {option} at a local "
            "directory written by save_pretrained (nothing is downloaded); for tiny random test models run "
            "`python -m experiments.make_tiny_models --out DIR`.")
    return directory


class ClipImageEmbedder(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (B, D) projected pooled CLIP embeddings (``output="image_embeds"``), or
    (B, T, C) patch tokens after the final LayerNorm without projection (``output="tokens"``, MindEye2's target).

    Preprocessing follows the directory's ``preprocessor_config.json`` (CLIPImageProcessor): resize the shortest
    edge (bicubic, antialiased), centre crop, normalise with its mean/std.
    """

    def __init__(self, model_dir: str, option: str = "--image-model", dtype: torch.dtype = torch.float32,
                 output: str = "image_embeds"):
        super().__init__()
        if output not in ("image_embeds", "tokens"):
            raise ValueError(f"output must be 'image_embeds' or 'tokens', got {output!r}")
        self.output = output
        from transformers import CLIPVisionModelWithProjection

        directory = require_model_dir(model_dir, option, ("config.json", "preprocessor_config.json"))
        self.model = CLIPVisionModelWithProjection.from_pretrained(directory, local_files_only=True,
                                                                   dtype=dtype).eval()
        cfg = json.loads((directory / "preprocessor_config.json").read_text())
        size = cfg.get("size", {})
        self.resize = int(size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else size)
        crop = cfg.get("crop_size", self.resize)
        self.crop = int(crop.get("height", self.resize) if isinstance(crop, dict) else crop)
        self.register_buffer("mean", torch.tensor(cfg["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["image_std"]).view(1, 3, 1, 1), persistent=False)
        self.dim = self.model.config.projection_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        x = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
        x = x[..., top: top + self.crop, left: left + self.crop].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.model.dtype)
        result = self.model(pixel_values=pixels)
        if self.output == "tokens":
            return self.model.vision_model.post_layernorm(result.last_hidden_state[:, 1:]).float()
        return result.image_embeds.float()


class ClipTextEmbedder(nn.Module):
    """Lists of captions per image -> (B, D): SDXL text encoder 2, penultimate layer at EOS, caption average."""

    def __init__(self, model_dir: str, option: str = "--text-model", text_subfolder: str = "text_encoder_2",
                 tokenizer_subfolder: str = "tokenizer_2", hidden_layer: int = -2, max_captions: int = 5,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        root = Path(model_dir) if model_dir else Path("")
        require_model_dir(root / text_subfolder, f"{option} ({text_subfolder}/)")
        require_model_dir(root / tokenizer_subfolder, f"{option} ({tokenizer_subfolder}/)", ("tokenizer_config.json",))
        self.model = CLIPTextModelWithProjection.from_pretrained(root / text_subfolder, local_files_only=True,
                                                                 dtype=dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(root / tokenizer_subfolder, local_files_only=True)
        self.hidden_layer, self.max_captions = hidden_layer, max_captions
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N,) strings -> (N, D) hidden state of layer ``hidden_layer`` at each text's EOS token."""
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                                max_length=self.tokenizer.model_max_length)
        ids = tokens["input_ids"].to(self.model.device)
        hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[self.hidden_layer]
        is_eos = ids == self.tokenizer.eos_token_id
        eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
        return hidden[torch.arange(len(texts), device=hidden.device), eos].float()

    def forward(self, captions: list[list[str]]) -> torch.Tensor:
        chosen = [(c or [""])[: self.max_captions] for c in captions]
        flat = [t for c in chosen for t in c]
        emb = self.embed_texts(flat)
        counts = torch.tensor([len(c) for c in chosen], device=emb.device)
        owner = torch.repeat_interleave(torch.arange(len(chosen), device=emb.device), counts, output_size=len(flat))
        out = torch.zeros(len(chosen), emb.shape[1], device=emb.device).index_add_(0, owner, emb)
        return out / counts[:, None]
