"""The one AdamW of both stages: which PyTorch implementation runs it (``adamw_impl`` in either module's YAML)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

AdamWImpl = Literal["fused", "foreach", "plain"]
IMPLEMENTATIONS: dict[str, dict[str, bool]] = {"fused": {"fused": True}, "foreach": {"foreach": True},
                                                 "plain": {"foreach": False}}


def adamw(params: Iterable[Any], lr: float, weight_decay: float, impl: AdamWImpl = "fused") -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (tensors or parameter groups). ``fused``: one kernel per step for all
    parameters (CPU and GPU; the per-tensor Python loop of ``plain`` costs about 30 us per trained tensor on CPU,
    e.g. 3 ms of a 50 ms stage-2 step of the tiny models with 176 LoRA and router tensors); ``foreach``: batched
    per-op kernels; ``plain``: one tensor at a time."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"adamw_impl {impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **IMPLEMENTATIONS[impl])
