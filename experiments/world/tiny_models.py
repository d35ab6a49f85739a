"""Tiny random CLIP and SDXL-shaped models saved to local directories, loaded back through the real ``from_pretrained`` path.

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


def make_tiny_sdxl(out: str | Path, text_dim: int = 32, seed: int = 0) -> Path:
    """Complete ``out`` (holding ``make_tiny_clip``'s text encoder 2) into a tiny SDXL-shaped diffusers directory:
    a 2-level UNet with cross-attention at two resolutions (cross width = te1 + te2 widths, SDXL's ``text_time``
    conditioning), a 3-block VAE (downscale 4, SDXL scaling factor 0.13025), a CLIP-L-like text encoder 1 and
    SDXL's Euler scheduler config. Saved with the pipeline's ``save_pretrained``; returns ``out``."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    te2 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2", local_files_only=True)
    tokenizer_2 = AutoTokenizer.from_pretrained(out / "tokenizer_2", local_files_only=True)
    torch.manual_seed(seed + 1)
    te1 = CLIPTextModel(CLIPTextConfig(
        vocab_size=te2.config.vocab_size, hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=te2.config.max_position_embeddings,
        bos_token_id=te2.config.bos_token_id, eos_token_id=te2.config.eos_token_id,
        pad_token_id=te2.config.pad_token_id))
    pooled_dim = te2.config.projection_dim
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1), cross_attention_dim=text_dim + te2.config.hidden_size,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=pooled_dim + 6 * 8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 64), latent_channels=4,
        norm_num_groups=32, sample_size=64, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer_2,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out)
    return out
