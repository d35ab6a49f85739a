"""What stage 2 trains and what its checkpoints store: ONE definition, used by ``RoutedDiffusionModule`` (freezing,
stored parts) and the parameter report (``experiments.parameters.stage2``: the module itself on ``meta``; ``parameters.json``).

Parts, by module reference: ``lora`` (LoRA A/B of every peft LoRA layer of the UNet), ``routers`` (temporal and
spatial routers of every branch), ``projections`` (the brain prompt, and the image token projection when it is
trained from scratch) and ``ip_attention`` (the IP-Adapter: the IP key / value of every cross-attention layer, and,
when IP-Adapter weights are loaded, their image projection ``image_proj`` too). So with IP-Adapter weights loaded
and ``ip_adapter_trainable`` unset or false, the IP key / value AND the image projection stay frozen as loaded.

Also here: building a branch's frozen encoder and routers (``build_branch``, ``regional_grid``), the stored
parameter names and the checkpoint check (``stored_names``, ``check_stored``), the per-part parameter counts and
the ``init_from`` transfer loading (``load_stage2_transfer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from datamodules.common import DataFormatError
from lightning_modules.checkpoint_files import load_state_dict_file
from lightning_modules.run_records import count_parameters

Stage2Part = Literal["lora", "routers", "projections", "ip_attention"]
PARTS: tuple[Stage2Part, ...] = ("lora", "routers", "projections", "ip_attention")


def stage2_parts(unet: nn.Module, routers: Sequence[nn.Module], image_projection: nn.Module | None,
                 brain_prompt: nn.Module | None, ip_processors: Sequence[nn.Module], ip_adapter_loaded: bool
                 ) -> dict[str, list[nn.Module]]:
    """Part name -> its modules (see the module docstring; a part may be empty)."""
    from peft.tuners.lora import LoraLayer

    lora = [m for layer in unet.modules() if isinstance(layer, LoraLayer) for m in (layer.lora_A, layer.lora_B)]
    ip_projection = [image_projection] if image_projection is not None and ip_adapter_loaded else []
    own_projection = [image_projection] if image_projection is not None and not ip_adapter_loaded else []
    return {"lora": lora, "routers": [r for r in routers if r is not None],
            "projections": own_projection + ([brain_prompt] if brain_prompt is not None else []),
            "ip_attention": [*ip_processors, *ip_projection]}


def trained_and_stored(has_image_branch: bool, ip_adapter_loaded: bool, ip_adapter_trainable: bool | None,
                       trainable: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(parts trained, parts a checkpoint stores). Default training: lora, routers, projections, and the IP-Adapter
    (``ip_attention``) when it is not loaded from a file or ``ip_adapter_trainable`` says so; ``trainable``
    replaces the default. Stored: the default's parts and the trained ones (a transfer checkpoint is complete)."""
    unknown = sorted(set(trainable or []) - set(PARTS))
    if unknown:
        raise ValueError(f"model.trainable: unknown parts {unknown}; choose from {list(PARTS)}")
    ip_trainable = has_image_branch and (
        (not ip_adapter_loaded) if ip_adapter_trainable is None else bool(ip_adapter_trainable))
    default = ["lora", "routers", "projections"] + (["ip_attention"] if ip_trainable else [])
    trained = [p for p in PARTS if p in (default if trainable is None else trainable)]
    stored = [p for p in PARTS if p in default or p in trained]
    return trained, stored


def apply_trainable(parts: dict[str, list[nn.Module]], trained: Sequence[str], stored: Sequence[str],
                    frozen_dtype: torch.dtype | None = None) -> None:
    """Stored parts in float32; every part's parameters trainable exactly when the part is trained; the parts that
    are neither (loaded, frozen IP-Adapter weights) in ``frozen_dtype`` when given, like the UNet they extend."""
    for name in stored:
        for module in parts[name]:
            for p in module.parameters():
                p.data = p.data.float()
    for name, modules in parts.items():
        for module in modules:
            module.requires_grad_(name in trained)
            if frozen_dtype is not None and name not in stored:
                module.to(frozen_dtype)


def stored_names(module: nn.Module, parts: dict[str, list[nn.Module]], stored: Sequence[str]) -> set[str]:
    """Parameter names (in ``module``) of the ``stored`` parts: what a stage-2 checkpoint holds."""
    ids = {id(p) for name in stored for m in parts[name] for p in m.parameters()}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def parameter_counts(module: nn.Module, parts: dict[str, list[nn.Module]], trainable: list[str]) -> dict:
    """Parameters per part (params, share of the module's total, trainable) and the trained total."""
    total = sum(p.numel() for p in module.parameters())
    groups = {}
    for name, modules in parts.items():
        n, t = count_parameters(p for m in modules for p in m.parameters())
        groups[name] = {"params": n, "share": n / max(1, total), "trainable": t}
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"groups": groups, "total": total, "trainable": trained, "trainable_share": trained / max(1, total),
            "trainable_parts": trainable}


def load_stage2_transfer(module: nn.Module, path: str, expected: set[str]) -> None:
    """Load the stored parts (``expected`` names: LoRA, routers, projections, ...) of the stage-2 checkpoint
    ``path`` into ``module``."""
    state = load_state_dict_file(path, "model.init_from")
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"model.init_from {path} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: "
                         "a different configuration (branches, LoRA targets, IP-Adapter training)?")
    module.load_state_dict({k: state[k] for k in expected}, strict=False)


def check_stored(expected: set[str], found: set[str]) -> None:
    """A stage-2 checkpoint holds exactly the stored parts of this configuration."""
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ValueError(f"stage-2 checkpoint does not match this configuration: missing {missing[:3]}, "
                         f"unexpected {extra[:3]} (different branches, LoRA targets or IP-Adapter training?)")


def build_branch(spec, checkpoint: str | None, option: str, frozen_dtype: str, unet: nn.Module,
                 num_train_timesteps: int, cache: str | None = None, cache_option: str = "model.condition_cache",
                 **encoder_kw
                 ) -> tuple[nn.Module | None, nn.Module | None]:
    """One branch's frozen expert source and its trained ``RoutedBranch`` (temporal and spatial routers) for
    ``unet``; (None, None) when ``spec`` is None. The source is the ``FrozenStage1`` of ``checkpoint`` in
    ``frozen_dtype``, or, given ``cache`` (its conditioning-cache directory), a ``CachedStage1`` that reads the
    same embeddings and builds no encoder (it refuses a cache computed with other settings or weights)."""
    from lightning_modules.components.routed_branch import RoutedBranch
    from lightning_modules.condition_cache import CachedStage1
    from lightning_modules.sdxl_loading import DTYPES
    from lightning_modules.stage1_conditions import FrozenStage1

    if spec is None:
        return None, None
    if cache:
        settings = {"source": spec.source, "frozen_dtype": frozen_dtype, **encoder_kw}
        encoder = CachedStage1(cache, cache_option, settings, checkpoint)
    else:  # RNG-neutral (building stage 1 initialises weights it then loads), so a cached run starts identically
        with torch.random.fork_rng(devices=[]):
            encoder = FrozenStage1(checkpoint, option, spec.source, **encoder_kw).to(DTYPES[frozen_dtype])
    # the routers see the UNet's timestep sinusoid (time_proj width) and its noisy latent channels
    router = RoutedBranch(spec, encoder.embed_dim, encoder.num_experts, unet.time_proj.num_channels,
                          unet.config.in_channels, num_train_timesteps)
    return encoder, router


def branch_caches(caches: dict[str, str] | None, tables: dict[str, str] | None, **specs) -> dict[str, dict]:
    """``model.condition_cache`` -> per branch the ``build_branch`` keywords (``cache``, ``cache_option``); a
    cache for a disabled branch, or for a branch that a condition table already replaces, is refused."""
    caches = dict(caches or {})
    for branch in caches:
        if specs.get(branch) is None:
            raise DataFormatError(f"model.condition_cache.{branch}: no such branch in this configuration (branches: "
                             f"{[b for b, s in specs.items() if s is not None]})")
        if branch in (tables or {}):
            raise DataFormatError(f"model.condition_cache.{branch} and model.condition_tables.{branch} both replace the "
                             "branch's stage-1 experts: choose one")
    return {b: {"cache": caches.get(b), "cache_option": f"model.condition_cache.{b}"} for b in specs}


def regional_grid(*specs) -> int:
    """The one g of every regional (spatial) branch's g x g grid; 1 without one."""
    grids = {b.grid for b in specs if b is not None and b.spatial and b.regional}
    if len(grids) > 1:
        raise ValueError(f"regional image and text branches need the same grid, got {sorted(grids)}")
    return grids.pop() if grids else 1
