"""What stage 1 trains, how it counts its parameters and how it starts from another stage-1 checkpoint: ONE
definition, used by ``BrainEncoderModule`` (``parts()``, ``trainable``, ``parameter_counts()``, ``init_from``).

Parts, by module reference: ``new_adapters`` (adapters of ``new_subjects``), ``adapters`` (the other subjects'),
``routers`` (the gates), ``experts``, ``heads`` (backbone and clip heads), ``prior`` and ``token_head``. Every
parameter belongs to exactly one part; a part is trainable or frozen as a whole (``requires_grad``), except
parameters that their own module freezes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import nn

from datamodules.shard_format import subject_name
from lightning_modules.checkpoint_files import load_state_dict_file
from lightning_modules.components.batched_layers import BatchedLayerNorm
from lightning_modules.run_records import count_parameters

Part = Literal["new_adapters", "adapters", "routers", "experts", "heads", "prior", "token_head"]
ALL_PARTS: tuple[Part, ...] = ("new_adapters", "adapters", "routers", "experts", "heads", "prior", "token_head")
TRANSFER_PARTS: list[Part] = ["new_adapters", "routers"]


def stage1_parts(module: nn.Module, new_subjects: list[str]) -> dict[str, list[nn.Module]]:
    """A ``BrainEncoderModule``'s part name -> its modules (a part may be empty, e.g. no prior)."""
    new = set(new_subjects)
    adapters = module.adapters.adapters
    return {"new_adapters": [adapters[s] for s in adapters if s in new],
            "adapters": [adapters[s] for s in adapters if s not in new],
            "routers": list(module.moe.routers), "experts": list(module.moe.experts),
            "heads": [*module.moe.backbone_heads, *module.moe.clip_heads],
            "prior": [module.prior] if module.prior is not None else [],
            "token_head": [module.token_head] if module.token_head is not None else []}


def apply_trainable(module: nn.Module, parts: dict[str, list[nn.Module]], trainable: list[Part] | None,
                    new_subjects: list[str]) -> list[str]:
    """Freeze every part not in ``trainable`` (default: all parts, or with ``new_subjects`` the router-only
    transfer ``TRANSFER_PARTS``); returns the trained parts in ``ALL_PARTS`` order."""
    if trainable is None:
        trainable = list(TRANSFER_PARTS) if new_subjects else list(ALL_PARTS)
    unknown = sorted(set(trainable) - set(ALL_PARTS))
    if unknown:
        raise ValueError(f"model.trainable: unknown parts {unknown}; choose from {list(ALL_PARTS)}")
    if "new_adapters" in trainable and not new_subjects and "adapters" not in trainable:
        raise ValueError("model.trainable lists new_adapters but model.new_subjects is empty: "
                         "list adapters (the data subjects' adapters) instead")
    covered = {id(p) for modules in parts.values() for m in modules for p in m.parameters()}
    stray = [n for n, p in module.named_parameters() if id(p) not in covered]
    if stray:
        raise RuntimeError(f"parameters outside every trainable part: {stray[:4]}")
    fixed = {id(p) for p in module.parameters() if not p.requires_grad}  # frozen by their own module
    for name, modules in parts.items():
        for p in (p for m in modules for p in m.parameters()):
            p.requires_grad_(name in trainable and id(p) not in fixed)
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"model.trainable {trainable} selects no parameters")
    return [p for p in ALL_PARTS if p in trainable]


def parameter_counts(module: nn.Module, parts: dict[str, list[nn.Module]], trainable: list[str]) -> dict[str, Any]:
    """Parameters of the subject adapters, the routers and the rest, with shares of the total and trainable
    counts: ``{"groups": {name: {"params", "share", "trainable"}}, "total", "trainable", "trainable_share",
    "trainable_parts"}``."""
    total, trained = count_parameters(module.parameters())
    groups: dict[str, dict[str, float]] = {}
    seen: set[int] = set()
    for name in ("new_adapters", "adapters", "routers"):
        params = [p for m in parts[name] for p in m.parameters()]
        seen.update(id(p) for p in params)
        n, t = count_parameters(params)
        groups[name] = {"params": n, "share": n / max(1, total), "trainable": t}
    n, t = count_parameters(p for p in module.parameters() if id(p) not in seen)
    groups["rest"] = {"params": n, "share": n / max(1, total), "trainable": t}
    return {"groups": groups, "total": total, "trainable": trained,
            "trainable_share": trained / max(1, total),
            "trainable_parts": [p for p in trainable if parts[p]]}


def load_stage1_transfer(module: nn.Module, path: str, new_subjects: list[str], subjects: list[str]) -> None:
    """Load every weight of the stage-1 checkpoint ``path`` into ``module`` except the adapters of
    ``new_subjects`` (kept fresh); one error for a voxel-count, shape or key mismatch."""
    state = load_state_dict_file(path, "model.init_from")
    fresh = tuple(f"adapters.adapters.{s}." for s in new_subjects)
    own = module.state_dict()
    load = {k: v for k, v in state.items() if k in own and not k.startswith(fresh)}
    for subject in subjects:  # the adapters' input widths: voxel counts, named as such
        for key in (f"adapters.adapters.{subject}.weight", f"adapters.adapters.{subject}.0.weight"):
            if key in load and load[key].shape[-1] != own[key].shape[-1]:
                raise ValueError(f"model.init_from {path}: {subject} has {load[key].shape[-1]} voxels there "
                                 f"but {own[key].shape[-1]} in the data; list {subject} in model.new_subjects "
                                 "for a fresh adapter, or use the data the checkpoint was trained on")
    wrong = [f"{k} {list(v.shape)} (here {list(own[k].shape)})" for k, v in load.items()
             if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"model.init_from {path} has other shapes: {', '.join(wrong[:3])}: a different "
                         "architecture (model.moe, model.prior, model.b_size)?")
    missing = [k for k in own if k not in load and not k.startswith(fresh)]
    if missing:
        raise ValueError(f"model.init_from {path} lacks {missing[:4]}{'...' if len(missing) > 4 else ''}: "
                         "is a subject missing from model.new_subjects, or is the architecture different?")
    module.load_state_dict(load, strict=False)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: ``weight_decay`` on weights, none on biases and norms
    (``nn.LayerNorm``, ``BatchedLayerNorm``)."""
    no_decay = set()
    for m in module.modules():
        if isinstance(m, (nn.LayerNorm, BatchedLayerNorm)):
            no_decay.update(id(p) for p in m.parameters(recurse=False))
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            no_decay.add(id(p))
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]


def check_target_widths(caches: Any, expected: dict[tuple[str, str], int]) -> None:
    """Every target the model reads (``expected``: (option, cache name) -> flattened width, e.g. ``model.target``:
    (N, moe.out_dim); ``model.token_target``: (N, T * C) of the token head) exists in the data module's ``caches``
    with that flattened width, else one error naming the target key, the cache and both widths (whatever
    ``data.target_shapes`` says, or without it). ``caches`` not a dict (no data module): nothing to check."""
    if not isinstance(caches, dict):
        return
    for (option, name), width in expected.items():
        if name not in caches:
            raise ValueError(f"{option} {name!r} is not among data.targets {sorted(caches)}: add it there")
        shape = tuple(getattr(caches[name], "shape", ()))
        got = int(math.prod(shape)) if shape else None
        if got is not None and got != width:
            raise ValueError(f"{option} {name!r}: the target cache {getattr(caches[name], 'directory', '?')} "
                             f"holds {got}-wide items (shape {list(shape)}), the model predicts {width}: "
                             "recompute the cache with the model the config names, or fix the model's width")


def parameter_summary(counts: dict[str, Any]) -> str:
    """The one log line of ``parameter_counts``: every non-empty group's size, share and trained count."""
    g = counts["groups"]
    return "stage 1 parameters: " + ", ".join(
        f"{k} {v['params']:,} ({v['share']:.2%}, {v['trainable']:,} trained)" for k, v in g.items() if v["params"]) \
        + f"; trained {counts['trainable']:,} of {counts['total']:,} ({counts['trainable_share']:.2%})"


def check_subjects(num_voxels: dict[str, int] | None, new_subjects: list[str] | None, init_from: str | None
                   ) -> tuple[dict[str, int], list[str]]:
    """``model.num_voxels`` and ``model.new_subjects`` with canonical subject names, checked: voxel counts given,
    new subjects among the data subjects and an ``init_from`` checkpoint to add them to."""
    if not num_voxels:
        raise ValueError("model.num_voxels is empty: give {subject: voxel count} (the CLI links it from data)")
    voxels = {subject_name(k): int(v) for k, v in num_voxels.items()}
    new = [subject_name(s) for s in new_subjects or []]
    unknown = sorted(set(new) - set(voxels))
    if unknown:
        raise ValueError(f"model.new_subjects {unknown} are not among the data subjects {list(voxels)}")
    if new and not init_from:
        raise ValueError("model.new_subjects needs model.init_from (the checkpoint to add them to)")
    return voxels, new


def target_widths(module: nn.Module) -> dict[tuple[str, str], int]:
    """(option, cache name) -> flattened width of every target a ``BrainEncoderModule`` reads."""
    expected = {("model.target", module.hparams.target): module.moe.out_dim}
    if module.token_head is not None:
        expected[("model.token_target", module.hparams.token_target)] = (module.token_head.num_tokens
                                                                         * module.token_head.token_dim)
    return expected
