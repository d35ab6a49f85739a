"""The Gaussian target over hierarchy levels for the temporal router and its KL term (MoRE-Brain's KL guidance).

Levels are indexed 0 = coarsest (fewest experts) to L - 1 = finest.
``coarse_first`` (default): centre c(t) = (L - 1) * (1 - clip((t - t_lo) / (t_hi - t_lo), 0, 1)), so high noise
goes to coarse levels. ``paper``: the paper's mu_t = L t / T on 1-indexed levels, i.e. c(t) = L t / T - 1 here.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

KLDirection = Literal["coarse_first", "paper"]


def level_centres(timesteps: torch.Tensor, num_levels: int, t_lo: float, t_hi: float,
                  direction: KLDirection = "coarse_first", num_train_timesteps: int = 1000) -> torch.Tensor:
    """(B,) timesteps -> (B,) centre level c(t) (0-indexed)."""
    t = timesteps.float()
    if direction == "paper":
        return num_levels * t / num_train_timesteps - 1.0
    if direction != "coarse_first":
        raise ValueError(f"kl_direction {direction!r}: choose coarse_first or paper")
    if t_hi <= t_lo:
        raise ValueError(f"kl_t_hi ({t_hi}) must exceed kl_t_lo ({t_lo})")
    frac = ((t - t_lo) / (t_hi - t_lo)).clamp(0.0, 1.0)
    return (num_levels - 1) * (1.0 - frac)


def gaussian_level_target(timesteps: torch.Tensor, num_levels: int, sigma: float = 1.0, t_lo: float = 0.0,
                          t_hi: float = 1000.0, direction: KLDirection = "coarse_first",
                          num_train_timesteps: int = 1000) -> torch.Tensor:
    """(B,) timesteps -> (B, L) target p_l(t) proportional to exp(-(l - c(t))^2 / (2 sigma^2))."""
    centre = level_centres(timesteps, num_levels, t_lo, t_hi, direction, num_train_timesteps)
    levels = torch.arange(num_levels, device=timesteps.device, dtype=torch.float32)
    return torch.softmax(-((levels[None] - centre[:, None]) ** 2) / (2 * sigma**2), dim=-1)


def level_kl(router_probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(router || target) = sum_l r_l (log r_l - log p_l), averaged over the batch; (B, L), (B, L) -> scalar."""
    return kl_to_log_target(router_probs, torch.log(target.float() + eps), eps)


def kl_to_log_target(router_probs: torch.Tensor, log_target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``level_kl`` with the target given as log(p + eps) (B, L)."""
    r = router_probs.float()
    return (r * (torch.log(r + eps) - log_target)).sum(-1).mean()


@functools.lru_cache(maxsize=32)
def _log_target_table(num_levels: int, sigma: float, t_lo: float, t_hi: float, direction: KLDirection,
                      num_train_timesteps: int, device: torch.device, eps: float = 1e-8) -> torch.Tensor:
    """(T, L) log(p_l(t) + eps) at every training timestep t = 0 .. T - 1 (``gaussian_level_target``)."""
    steps = torch.arange(num_train_timesteps, device=device)
    target = gaussian_level_target(steps, num_levels, sigma, t_lo, t_hi, direction, num_train_timesteps)
    return torch.log(target + eps)


def kl_terms(router_probs: dict[str, torch.Tensor | None], timesteps: torch.Tensor, sigma: float, t_lo: float,
             t_hi: float | None, direction: KLDirection, num_train_timesteps: int) -> dict[str, torch.Tensor]:
    """Per branch, the KL guidance term KL(temporal router's level weights (B, L) || Gaussian over levels at each
    timestep); branches without temporal router probabilities (None) are left out. ``t_hi`` None: the last
    training timestep count. Integer training timesteps read the target from a table of every timestep, computed
    once per setting (the same numbers: one Gaussian per row); other timesteps compute it."""
    out = {}
    t_hi = t_hi if t_hi is not None else num_train_timesteps
    for branch, probs in router_probs.items():
        if probs is None:
            continue
        if not timesteps.dtype.is_floating_point and timesteps.device.type != "meta":
            table = _log_target_table(probs.shape[1], float(sigma), float(t_lo), float(t_hi), direction,
                                      num_train_timesteps, timesteps.device)
            out[branch] = kl_to_log_target(probs, table[timesteps])
            continue
        target = gaussian_level_target(timesteps, probs.shape[1], sigma, t_lo, t_hi, direction, num_train_timesteps)
        out[branch] = level_kl(probs, target)
    return out
