"""Preprocessing of MindEye2's evaluation recipe: every image goes to 256 x 256 first (bilinear), then to each
metric's own size and normalisation.

All resizes are torchvision's tensor ``Resize`` on square images, i.e. ``torch.nn.functional.interpolate`` with
``align_corners=False``; ``antialias`` defaults to False, what MindEye2's tensor resizes did on the torchvision it
was run with (tensor resizes only antialias by default from torchvision 0.17). A resize to the size an image
already has returns it unchanged, as torchvision does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

EVAL_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# skimage.color.rgb2gray (ITU-R BT.709 luma): 0.2125 R + 0.7154 G + 0.0721 B
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) array or (B, 3, H, W) tensor -> float32 (B, 3, H, W) in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if images.dtype == torch.uint8:
        return images.float() / 255
    return images.float()


def resize(images: torch.Tensor, size: int, antialias: bool = False, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size) as torchvision's tensor ``Resize((size, size))``."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False, antialias=antialias)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def rgb2gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W) with skimage's ``rgb2gray`` weights."""
    weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device)
    return torch.einsum("bchw,c->bhw", images, weights)


def to_eval_size(images: np.ndarray | torch.Tensor, antialias: bool = False) -> torch.Tensor:
    """uint8 or float images -> float32 (B, 3, 256, 256) in [0, 1]: the common first step of every metric."""
    return resize(to_float(images), EVAL_SIZE, antialias)


@dataclass(frozen=True)
class Preprocess:
    """A metric's preprocessing of the 256 px images: resize to ``size`` (``mode``), then optionally normalise."""

    size: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    mode: str = "bilinear"

    def __call__(self, images256: torch.Tensor, antialias: bool = False) -> torch.Tensor:
        out = resize(images256, self.size, antialias, self.mode)
        return normalize(out, self.mean, self.std) if self.mean is not None else out


PIXCORR = Preprocess(425)
SSIM = Preprocess(425)
ALEXNET = Preprocess(256, IMAGENET_MEAN, IMAGENET_STD)
INCEPTION = Preprocess(342, IMAGENET_MEAN, IMAGENET_STD)
CLIP = Preprocess(224, CLIP_MEAN, CLIP_STD)
EFFNET = Preprocess(255, IMAGENET_MEAN, IMAGENET_STD)
SWAV = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD)
DREAMSIM = Preprocess(224, mode="bicubic")  # MoRE-Brain: bicubic to 224, [0, 1]; the model normalises itself
