"""Load SDXL's parts from a local diffusers directory (``from_pretrained``, never a download).

The directory has the layout of ``stabilityai/stable-diffusion-xl-base-1.0``: ``unet/``, ``vae/``, ``scheduler/``,
``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``. A missing part raises
``MissingWeightsError`` naming the option to set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_modules.components.target_embedders import MissingWeightsError

NEEDS = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
         "text_encoder": "config.json", "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
         "tokenizer_2": "tokenizer_config.json"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SDXLParts:
    unet: Any
    vae: Any
    scheduler_config: dict
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any


def check_sdxl_dir(directory: str | Path | None, option: str = "model.sdxl_dir") -> Path:
    root = Path(directory) if directory else None
    missing = [f"{part}/{name}" for part, name in NEEDS.items() if root is None or not (root / part / name).is_file()]
    if missing:
        raise MissingWeightsError(
            f"{option}: {directory!r} is not a local SDXL directory (missing {', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}). Point {option} at a copy of stable-diffusion-xl-base-1.0 "
            "saved with save_pretrained (nothing is downloaded); tiny random test models: "
            "`python -m experiments.make_tiny_models --out DIR`.")
    return root


def load_sdxl(directory: str | Path, option: str = "model.sdxl_dir", dtype: str = "float32") -> SDXLParts:
    """All SDXL parts from ``directory``; the UNet and VAE weights are loaded in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    root = check_sdxl_dir(directory, option)
    kw = {"local_files_only": True}
    torch_dtype = DTYPES[dtype]
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype, **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32, **kw)
    import json

    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return SDXLParts(unet=unet, vae=vae, scheduler_config=scheduler_config,
                     text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
                     text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", **kw),
                     tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer", **kw),
                     tokenizer_2=AutoTokenizer.from_pretrained(root / "tokenizer_2", **kw))


@torch.no_grad()
def encode_prompt(parts: SDXLParts, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding: penultimate hidden states of both text encoders concatenated -> (S, C), and text
    encoder 2's projected pooled embedding -> (P,)."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2][0])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds[0]
    return torch.cat(hidden, -1), pooled
