"""LPIPS (Zhang et al. 2018; not part of MindEye2's table), lower is better.

The ``lpips`` package's AlexNet variant (v0.1): its shipped linear heads (``lpips/weights/v0.1/alex.pth``, inside
the wheel) on an AlexNet backbone loaded from the same local torchvision AlexNet file as ``--alexnet`` (the
backbone ``lpips.LPIPS(net="alex")`` would otherwise download). Computed on the 256 px images in [0, 1]
(``normalize=True`` maps them to [-1, 1]), spatially averaged, one distance per pair.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from experiments.evaluation.networks import load_state_dict_file


def _backbone_state(alexnet_state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision AlexNet ``features.<i>.<param>`` -> the lpips backbone's ``slice<k>.<i>.<param>``."""
    mapped = {}
    for name in net.state_dict():
        _, index, param = name.split(".")
        mapped[name] = alexnet_state[f"features.{index}.{param}"]
    return mapped


class LPIPSDistance(nn.Module):
    def __init__(self, alexnet_path: str | Path, option: str = "--alexnet", device: str | torch.device = "cpu"):
        super().__init__()
        import lpips

        state = load_state_dict_file(alexnet_path, option)
        with warnings.catch_warnings():  # lpips builds torchvision's alexnet with the deprecated ``pretrained``
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        try:
            model.net.load_state_dict(_backbone_state(state, model.net))
        except (KeyError, RuntimeError) as exc:
            from lightning_modules.components.target_embedders import MissingWeightsError

            raise MissingWeightsError(f"{option}: {alexnet_path} is not a torchvision AlexNet state dict ({exc})") \
                from exc
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @torch.inference_mode()
    def forward(self, gt256: torch.Tensor, rec256: torch.Tensor) -> torch.Tensor:
        """Per-pair LPIPS of (B, 3, H, W) images in [0, 1] -> (B,) float64."""
        out = self.model(gt256.to(self.device), rec256.to(self.device), normalize=True)
        return out.flatten().double().cpu()
