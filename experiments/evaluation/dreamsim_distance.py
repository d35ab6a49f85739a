"""DreamSim (Fu et al. 2023), as MoRE-Brain's ``final_evaluations.py`` adds it; lower is better.

The ``dreamsim`` package (0.2.1; the optional extra ``pip install -e '.[dreamsim]'`` adds it with pinned
open_clip_torch, timm and ftfy, without changing any other pinned package), default "ensemble" model (DINO ViT-B/16 + CLIP ViT-B/16 +
OpenCLIP ViT-B/16 with the DreamSim LoRA), normalised embeddings; the distance of a pair is 1 - cosine similarity
of the embeddings. Input: the 256 px images resized to 224 with bicubic interpolation, in [0, 1].

Weights come only from ``--dreamsim DIR``, the package's ``cache_dir``: the unzipped DreamSim ensemble checkpoint
(``dino_vitb16_pretrain.pth``, ``clip_vitb16_pretrain.pth.tar``, ``open_clip_vitb16_pretrain.pth.tar``,
``ensemble_lora/``) plus what the package fetches through torch.hub with that directory as hub dir: the DINO code
(``facebookresearch_dino_main/``, a checkout of github.com/facebookresearch/dino) and its backbone weights
(``checkpoints/dino_vitbase16_pretrain.pth``). Every file is checked first; downloads are disabled while the
model is built, and torch.hub's directory is restored afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from experiments.evaluation.preprocessing import DREAMSIM
from lightning_modules.components.target_embedders import MissingWeightsError

PACKAGE_HINT = "pip install -e '.[dreamsim]'; it installs beside the pinned stack without changing it"
REQUIRED_FILES = (
    "dino_vitb16_pretrain.pth",
    "clip_vitb16_pretrain.pth.tar",
    "open_clip_vitb16_pretrain.pth.tar",
    "ensemble_lora/adapter_config.json",
    "facebookresearch_dino_main/hubconf.py",
    "checkpoints/dino_vitbase16_pretrain.pth",
)


def package_missing() -> str | None:
    """None when the ``dreamsim`` package is importable, else the reason the metric is skipped."""
    if importlib.util.find_spec("dreamsim") is None:
        return f"dreamsim package not installed ({PACKAGE_HINT})"
    return None


def missing_files(cache_dir: str | Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (Path(cache_dir) / name).exists()]


@contextlib.contextmanager
def no_downloads(option: str) -> Iterator[None]:
    """Make any torch.hub download fail (naming ``option``) and restore torch.hub's directory afterwards."""
    original_download, original_dir = torch.hub.download_url_to_file, torch.hub.get_dir()

    def refuse(url: str, dst: str, *args, **kwargs):
        raise MissingWeightsError(f"{option}: DreamSim tried to download {url} to {dst}; put the file there "
                                  "(nothing is downloaded)")

    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original_download
        torch.hub.set_dir(original_dir)


class DreamSimDistance(nn.Module):
    def __init__(self, cache_dir: str | Path, option: str = "--dreamsim", device: str | torch.device = "cpu"):
        super().__init__()
        reason = package_missing()
        if reason:
            raise MissingWeightsError(f"{option}: {reason}")
        absent = missing_files(cache_dir)
        if absent:
            raise MissingWeightsError(f"{option}: {cache_dir} lacks {', '.join(absent)} (the unzipped DreamSim "
                                      "ensemble checkpoint plus torch.hub's DINO code and weights; nothing is "
                                      "downloaded)")
        from dreamsim import dreamsim

        with no_downloads(option), contextlib.redirect_stdout(None):
            model, _ = dreamsim(pretrained=True, device=str(device), cache_dir=str(cache_dir),
                                dreamsim_type="ensemble", normalize_embeds=True)
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.inference_mode()
    def embed(self, images256: torch.Tensor, antialias: bool = False) -> torch.Tensor:
        """(B, 3, 256, 256) in [0, 1] -> (B, D) normalised DreamSim embeddings."""
        return self.model.embed(DREAMSIM(images256.to(self.device), antialias)).reshape(len(images256), -1)


def dreamsim_distance(gt_embeds: torch.Tensor, rec_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair DreamSim distance, 1 - cosine similarity -> (B,) float64."""
    return (1 - torch.nn.functional.cosine_similarity(gt_embeds.double(), rec_embeds.double(), dim=-1)).cpu()
