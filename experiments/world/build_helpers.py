"""Shared helpers of the world build: seeding, progress bars, CLIP pixel normalisation."""

from __future__ import annotations

import random

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def seed_everything(seed: int, threads: int | None = None) -> torch.Generator:
    """Seed python, numpy and torch (and fix the thread count when given); returns a torch generator seeded with
    ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def clip_normalise(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> CLIP-normalised pixels (what ``ClipImageEmbedder.preprocess`` gives at size S)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    """A tqdm bar (or the bare iterable when disabled)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=1.0)


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, params) -> float:
    """One step of every world part's training loop: backward, gradient norm clipped to 1, optimiser and schedule
    step; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item()
