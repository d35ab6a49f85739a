"""Stage-2 parameter counts at any scale, from the real ``RoutedDiffusionModule`` built on the ``meta`` device.

Nothing is loaded: ``RoutedDiffusionModule.__init__`` reads only config files (``sdxl_loading.sdxl_skeleton``; the
weights come in ``configure_model``). The SDXL configs are those under the run config's ``model.sdxl_dir``, or, where
it holds none, SDXL base's (``sdxl_base``, written to a temporary config-only directory). Each branch's stage-1 shape
(expert width, experts per level) is given as an empty conditioning cache: what a paper-scale rank reads, holding
no stage-1 encoder (the encoders' own parameters are stage 1's report). The rows come from the module's parts
(``RoutedDiffusionModule.parts()``, the one definition of what is trained).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.caching.conditions import BRANCHES, PartWriter, branch_settings, part_meta
from experiments.parameters.sdxl_base import write_config_only_sdxl
from lightning_modules.components.routed_branch import BranchSpec
from lightning_modules.run_records import count_parameters
from lightning_modules.sdxl_loading import LORA_TARGETS


def _row(key: str, name: str, params: int, trainable: int, depth: int = 1) -> dict:
    return {"key": key, "name": name, "params": params, "trainable": trainable, "depth": depth}


def shape_cache(directory: Path, model: dict[str, Any], branch: str, embed_dim: int, num_experts: Sequence[int],
                subject: str = "subj01") -> Path:
    """An empty conditioning cache (no rows) of one branch: the stage-1 shape a meta build needs."""
    meta = part_meta(branch, settings=branch_settings(model, branch), encoder={"path": None, "sha256": None,
                                                                             "target": None},
                     num_experts=list(num_experts), embed_dim=embed_dim, subject=subject, num_voxels=1,
                     part=(0, 1), counts={"train": 0, "eval": 0})
    part = directory / branch / subject
    PartWriter(part / ".part-0-of-1.tmp", meta, meta["counts"], (sum(num_experts), embed_dim)).finish(
        part / "part-0-of-1")
    return directory / branch


def build_on_meta(init_args: dict[str, Any], workdir: Path, embed_dim: int = 1280,
                  num_experts: Sequence[int] = (2, 4, 8, 16)) -> tuple[Any, str]:
    """The stage-2 module of ``init_args`` (a run config's ``model.init_args``) on ``meta``, and where its SDXL
    configs came from."""
    from experiments._config import build
    from lightning_modules.routed_diffusion import RoutedDiffusionModule

    args = {k: v for k, v in init_args.items() if k != "condition_tables"}
    sdxl = Path(str(args.get("sdxl_dir") or ""))
    if args.get("sdxl_dir") and (sdxl / "unet" / "config.json").is_file():
        source = str(sdxl)
    else:
        args["sdxl_dir"], source = str(write_config_only_sdxl(workdir / "sdxl")), "SDXL base (built in)"
    args["condition_cache"] = {b: str(shape_cache(workdir / "cache", args, b, embed_dim, num_experts))
                               for b in BRANCHES if args.get(f"{b}_branch") is not None}
    args["num_voxels"] = None
    for b in BRANCHES:  # the CLI's typed value (the config holds its fields)
        if isinstance(args.get(f"{b}_branch"), dict):
            args[f"{b}_branch"] = BranchSpec(**args[f"{b}_branch"])
    with torch.device("meta"):
        module = build({"class_path": f"{RoutedDiffusionModule.__module__}.{RoutedDiffusionModule.__name__}",
                        "init_args": args})
    return module, source


def module_rows(module) -> list[dict]:
    """Rows ``{key, name, params, trainable, depth}`` of a ``RoutedDiffusionModule`` by part; the last row is the
    module's total, with ``trainable_share``."""
    parts = module.parts()
    h = module.hparams
    lora_total, lora_trainable = count_parameters(p for m in parts["lora"] for p in m.parameters())
    ip_total, ip_train = count_parameters(p for m in module.ip_processors for p in m.parameters())
    unet_total, _ = count_parameters(module.unet.parameters())
    targets = len(h.lora_targets or LORA_TARGETS)
    rows = [_row("unet_base", "UNet (frozen)", unet_total - lora_total - ip_total, 0),
            _row("lora", f"UNet LoRA r={h.lora_rank}, {targets} targets", lora_total, lora_trainable),
            _row("ip_kv", f"IP key/value, {len(module.ip_processors)} layers", ip_total, ip_train)]
    if module.image_projection is not None:
        p = module.image_projection
        rows.append(_row("image_projection", f"image projection ({p.proj.in_features} -> {p.num_tokens} x "
                         f"{p.cross_dim})", *count_parameters(p.parameters())))
    for branch in BRANCHES:
        router = getattr(module, f"{branch}_router")
        if router is None:
            continue
        spec = router.spec
        rows.append(_row(f"{branch}_router", f"{branch} router", *count_parameters(router.parameters())))
        rows.append(_row(f"{branch}_router.temporal", f"temporal ({spec.temporal})",
                         *count_parameters(router.temporal.parameters()), 2))
        spatial = count_parameters(router.spatial.parameters()) if router.spatial is not None else (0, 0)
        label = f"spatial (grid {spec.grid})" if router.spatial is not None else "spatial (off: level pooling)"
        rows.append(_row(f"{branch}_router.spatial", label, *spatial, 2))
    if module.brain_prompt is not None:
        rows.append(_row("text_prompt", f"text prompt ({h.prompt_mode}, pooled {h.pooled_text})",
                         *count_parameters(module.brain_prompt.parameters())))
    rows.append(_row("vae", "VAE (frozen)", *count_parameters(module.vae.parameters())))
    total, trainable = count_parameters(module.parameters())
    listed = [r for r in rows if r["depth"] == 1]
    if sum(r["params"] for r in listed) != total:
        raise AssertionError(f"the part rows sum to {sum(r['params'] for r in listed)}, the module holds {total}")
    rows.append({**_row("total", "total", total, trainable, 0), "trainable_share": trainable / total})
    return rows


def stage2_report(init_args: dict[str, Any], embed_dim: int = 1280, num_experts: Sequence[int] = (2, 4, 8, 16)
                  ) -> tuple[list[dict], str]:
    """``module_rows`` of the module of ``init_args`` built on ``meta``, and where its SDXL configs came from."""
    with tempfile.TemporaryDirectory() as tmp:
        module, source = build_on_meta(init_args, Path(tmp), embed_dim, num_experts)
        return module_rows(module), source


def format_report(rows: list[dict]) -> str:
    """``format_table`` plus the trainable total and share."""
    from experiments.parameters.table import format_table

    total = rows[-1]
    return (f"{format_table(rows)}\ntrainable {total['trainable']:,d} of {total['params']:,d} "
            f"({total['trainable'] / max(total['params'], 1):.2%})")
