"""Refuse a world directory that cannot serve: incomplete, built for another image size, or with other CLIP widths.

Every refusal is one line naming the directory, the missing or mismatched part and the option to change.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_modules.components.target_embedders import MissingWeightsError

REQUIRED = {
    "clip": ("image_encoder/config.json", "image_encoder/preprocessor_config.json", "image_encoder/model.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/config.json",
             "text_encoder_2/model.safetensors", "tokenizer/tokenizer_config.json", "tokenizer_2/vocab.json",
             "tokenizer_2/merges.txt", "tokenizer_2/tokenizer_config.json"),
    "vae": ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"),
    "unet": ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "scheduler/scheduler_config.json"),
    "ip_adapter": ("ip_adapter.safetensors",),
}


class IncompleteWorldError(MissingWeightsError):
    """A world directory lacks a part (a FileNotFoundError)."""


class WorldMismatchError(ValueError):
    """A world directory was built for another image size or CLIP widths."""


def check_world(directory: str | Path, option: str = "--world", image_size: int | None = None,
                image_embed_dim: int | None = None, text_embed_dim: int | None = None) -> dict:
    """Return the world's manifest (world.json) after checking ``directory``; raise one-line errors otherwise."""
    root = Path(directory) if directory else None
    if root is None or not (root / "world.json").is_file():
        raise IncompleteWorldError(f"{option}: {directory} is not a world directory (missing part: world.json); "
                                   "build one with `python -m experiments.make_world --out DIR`")
    manifest = json.loads((root / "world.json").read_text())
    for part, files in REQUIRED.items():
        missing = [f for f in files if not (root / f).is_file()]
        if part not in manifest.get("parts", {}) or missing:
            what = missing[0] if missing else "not recorded in world.json"
            raise IncompleteWorldError(f"{option}: world {root} is incomplete (missing part {part}: {what}); "
                                       f"rerun `python -m experiments.make_world --out {root}` to finish it")
    if image_size is not None and manifest.get("image_size") != image_size:
        raise WorldMismatchError(f"{option}: world {root} was built for {manifest.get('image_size')} px images "
                                 f"(part: world.json image_size), not {image_size} px; build one with "
                                 f"--image-size {image_size}")
    widths = {"image_embed_dim": ("image_encoder", "projection_dim", image_embed_dim),
              "text_embed_dim": ("text_encoder_2", "hidden_size", text_embed_dim)}
    for name, (part, key, want) in widths.items():
        have = json.loads((root / part / "config.json").read_text()).get(key)
        if want is not None and have != want:
            raise WorldMismatchError(f"{option}: world {root} has {name} {have} (part {part}/config.json {key}), "
                                     f"not {want}")
    return manifest


def stage1_width_overrides(directory: str | Path) -> list[str]:
    """CLI overrides that give stage 1 the world CLIP's embedding width (the MoE's ``out_dim`` and the prior's
    ``embed_dim``), read from ``image_encoder/config.json``."""
    width = int(json.loads((Path(directory) / "image_encoder" / "config.json").read_text())["projection_dim"])
    return [f"--model.init_args.moe.init_args.out_dim={width}", f"--model.init_args.prior.init_args.embed_dim={width}"]
