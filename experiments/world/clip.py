"""The world's CLIP: a small ViT image tower and a small text transformer, trained contrastively together.

Image tower: ``CLIPVisionModelWithProjection`` (B, 3, S, S) -> ``image_embeds`` (B, P). Text tower:
``CLIPTextModelWithProjection`` (B, L) token ids -> ``text_embeds`` (B, P) and hidden states (B, L, H). Loss:
symmetric InfoNCE with a learnable temperature; captions that are the same string count as positives of each
other; the full caption (template 0: size, colour, texture, object, quadrant) is drawn with probability
``full_caption_prob`` (else a uniform template). Optionally, as in SLIP, a second image-image InfoNCE between two
degraded views of each scene (a random blend towards a Gaussian blur, random pixel noise: what a reconstruction
does to an image) with weight ``view_weight``: the embedding then tells scenes apart instance by instance and
shrugs off blur, so a faithful reconstruction is identified as its stimulus. SDXL's first text encoder (``text_encoder/``, a ``CLIPTextModel``) is the same trained transformer without its
projection (the simplest honest choice: one learned text space, read by both SDXL slots).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.world.build_helpers import (
    CLIP_MEAN,
    CLIP_STD,
    clip_normalise,
    optimiser_step,
    progress,
    seed_everything,
)
from experiments.world.scenes import Scenes


@dataclass
class ClipConfig:
    embed_dim: int = 64  # projection width: image_embeds and text_embeds (SDXL's pooled width)
    vision_width: int = 64
    vision_layers: int = 3
    text_width: int = 64  # hidden width (ClipTextEmbedder's target width; half the UNet's cross width)
    text_layers: int = 3
    heads: int = 4
    input_size: int = 32  # the tower's input (CLIPImageProcessor resizes the scene to it, as CLIP resizes to 224)
    patches: int = 8  # patches per side
    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    full_caption_prob: float = 0.0  # template 0 (every factor named) drawn this often, else a uniform template
    view_weight: float = 0.0  # weight of the image-image InfoNCE between two degraded views (0: off)
    blur: float = 0.0  # a view blends up to this far towards a Gaussian blur (sigma 0.75 input px)
    noise: float = 0.0  # a view gets pixel noise of std up to this (pixels in [0, 1])


def build_clip(cfg: ClipConfig, tokenizer):
    """Untrained (vision, text) towers for ``cfg.input_size`` px inputs and ``tokenizer``'s vocabulary."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=2 * cfg.vision_width, num_attention_heads=cfg.heads,
        num_hidden_layers=cfg.vision_layers, image_size=cfg.input_size, patch_size=cfg.input_size // cfg.patches,
        projection_dim=cfg.embed_dim, image_mean=list(CLIP_MEAN)))
    vocab = tokenizer.get_vocab()
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_attention_heads=cfg.heads, num_hidden_layers=cfg.text_layers,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=cfg.embed_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    return vision, text


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """(N,) captions -> (N, L) ids padded to the tokenizer's ``model_max_length``."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_clip(cfg: ClipConfig, scenes: Scenes, tokenizer, image_size: int, seed: int, show: bool = True):
    """Train both towers on ``scenes`` (each step: ``batch`` images, one caption each, see the module docstring)."""
    gen = seed_everything(seed)
    vision, text = build_clip(cfg, tokenizer)
    pixels = clip_pixels(torch.from_numpy(scenes.pixels()), cfg.input_size, normalise=False)
    flat = [c for caps in scenes.captions for c in caps]
    ids = tokenize(tokenizer, flat).view(len(scenes), len(scenes.captions[0]), -1)  # (N, 5, L)
    _, caption_id = np.unique(np.array(flat), return_inverse=True)
    caption_id = torch.from_numpy(caption_id.reshape(len(scenes), -1))
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*vision.parameters(), *text.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    vision.train()
    text.train()
    losses = []
    views = 2 if cfg.view_weight > 0 else 1
    for _ in progress(range(cfg.steps), "clip", enabled=show):
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=gen)
        tpl = torch.randint(0, ids.shape[1], (cfg.batch,), generator=gen)
        tpl = torch.where(torch.rand(cfg.batch, generator=gen) < cfg.full_caption_prob, 0, tpl)
        x = degrade(pixels[idx].repeat(views, 1, 1, 1), cfg.blur, cfg.noise, gen)
        img = F.normalize(vision(pixel_values=clip_normalise(x)).image_embeds, dim=-1).chunk(views)
        txt = F.normalize(text(input_ids=ids[idx, tpl]).text_embeds, dim=-1)
        cid = caption_id[idx, tpl]
        same = (cid[:, None] == cid[None]).float()
        scale = logit_scale.clamp(max=math.log(100)).exp()
        loss = symmetric_info_nce(scale * img[0] @ txt.T, same / same.sum(1, keepdim=True))
        if views == 2:
            loss = loss + cfg.view_weight * symmetric_info_nce(scale * img[0] @ img[1].T, torch.eye(cfg.batch))
        losses.append(optimiser_step(loss, opt, sched, params))
    return vision.eval(), text.eval(), {"final_loss": float(np.mean(losses[-50:])),
                                        "temperature": float(1 / logit_scale.detach().exp())}


def symmetric_info_nce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, B) logits, (B, B) row-stochastic target -> mean of both directions' soft cross-entropy."""
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def degrade(pixels: torch.Tensor, blur: float, noise: float, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, s, s) in [0, 1] -> the same blended a uniform [0, ``blur``) of the way towards a Gaussian blur
    (sigma 0.75 px) plus pixel noise of std uniform in [0, ``noise``), clamped to [0, 1]."""
    if blur <= 0 and noise <= 0:
        return pixels
    b, c = pixels.shape[:2]
    kernel = torch.exp(-0.5 * (torch.arange(-2, 3.0) / 0.75) ** 2)
    kernel = (kernel / kernel.sum()).repeat(c, 1)
    soft = F.conv2d(F.pad(pixels, (2, 2, 0, 0), mode="replicate"), kernel.view(c, 1, 1, 5), groups=c)
    soft = F.conv2d(F.pad(soft, (0, 0, 2, 2), mode="replicate"), kernel.view(c, 1, 5, 1), groups=c)
    x = pixels + blur * torch.rand(b, 1, 1, 1, generator=gen) * (soft - pixels)
    x = x + noise * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def clip_pixels(pixels: torch.Tensor, input_size: int, normalise: bool = True) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (B, 3, s, s) the tower's input, exactly as ``ClipImageEmbedder.preprocess``
    computes it from a ``shortest_edge = s`` processor config (bicubic antialiased resize, clamp, normalise; the
    resized [0, 1] pixels with ``normalise=False``)."""
    if pixels.shape[-1] != input_size:
        pixels = F.interpolate(pixels.float(), size=(input_size, input_size), mode="bicubic", antialias=True,
                               align_corners=False)
    return clip_normalise(pixels.clamp(0, 1)) if normalise else pixels.clamp(0, 1)


def save_clip(vision, text, tokenizer, input_size: int, out: Path) -> None:
    """Write ``image_encoder/`` (+ preprocessor config), ``text_encoder_2/``, ``tokenizer_2/`` and SDXL's first text
    encoder slot (``text_encoder/``: the same transformer as a ``CLIPTextModel``, ``tokenizer/``) under ``out``."""
    from transformers import CLIPImageProcessor, CLIPTextModel

    vision.save_pretrained(out / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": input_size}, crop_size={"height": input_size, "width": input_size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out / "image_encoder")
    text.save_pretrained(out / "text_encoder_2")
    te1 = CLIPTextModel(text.config)
    te1.load_state_dict(text.text_model.state_dict())
    te1.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer_2")
    if (out / "tokenizer").exists():
        shutil.rmtree(out / "tokenizer")
    shutil.copytree(out / "tokenizer_2", out / "tokenizer")  # vocab.json, merges.txt and the tokenizer configs


def load_clip(root: Path):
    """(ClipImageEmbedder, CLIPTextModelWithProjection, tokenizer) loaded back from ``root`` via the real loaders."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    from lightning_modules.components.target_embedders import ClipImageEmbedder

    image = ClipImageEmbedder(str(root / "image_encoder"))
    text = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True)
    return image, text, tok


@torch.no_grad()
def embed_images(embedder, pixels: np.ndarray, batch: int = 256) -> torch.Tensor:
    """(N, 3, S, S) float [0, 1] -> (N, P) image_embeds through ``ClipImageEmbedder``."""
    return torch.cat([embedder(torch.from_numpy(pixels[i: i + batch])) for i in range(0, len(pixels), batch)])


@torch.no_grad()
def embed_texts(text, tokenizer, captions: list[str], batch: int = 512) -> torch.Tensor:
    """(N,) captions -> (N, P) projected text_embeds."""
    return torch.cat([text(input_ids=tokenize(tokenizer, captions[i: i + batch])).text_embeds
                      for i in range(0, len(captions), batch)])
