"""The temporal router against its prior: is MoRE-Brain's coarse-to-fine schedule learned or imposed?

The same stage-2 fit (same seed, data and budget) with the KL guidance off (``kl_weight`` 0) and at the default
weight, plus the untrained router both start from. For each run and branch: the router's learned level softmax at
every training timestep (``interpretability.temporal_routing.temporal_arrays``, nothing multiplied in), its
expected level E[l](t) and the Spearman correlation of E[l] with t (the KL target's ``coarse_first`` direction
puts noisy steps on coarse levels: negative), and KL(router || target) averaged over timesteps; and each fitted
run's test reconstructions through the evaluation suite (PixCorr, SSIM, two-way and N-way identification with
the world's CLIP). If the KL-off run drifts toward the target too, the schedule is learned; if it stays where
the untrained router was, the target imposes it. Both stage-1 routers side by side (``scorings``): the fits run
once on the config's stage-1 encoders (the reference ``value`` router, the demo's) and once on encoders whose
router keeps unit identity (``unit``, fitted here with the world's stage-1 configs and the config's data), and
on dense encoders (``dense``: capacity factor 2, no expert choice, a baseline).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.common import provenance
from experiments.studies.runs import STAGE2_WORLD, cli_args, fit_world_encoders, run_dir

UNTRAINED = "untrained"
ENCODER_OPTION = {"clip_image": "image_encoder", "clip_text": "text_encoder"}


def default_kl_weight() -> float:
    """``RoutedDiffusionModule``'s own default ``kl_weight`` (one definition)."""
    from lightning_modules.routed_diffusion import RoutedDiffusionModule

    return float(inspect.signature(RoutedDiffusionModule.__init__).parameters["kl_weight"].default)


@dataclass
class TemporalStudy:
    """out_dir: runs and results; configs: the stage-2 config stack; kl_weights: one fit each (default: 0 and the
    module's default); overrides: CLI overrides for every run (data, world, stage-1 checkpoints, epochs);
    bootstrap: resamples of the evaluation's intervals; scorings: the stage-1 routers' unit scorings, each with
    every KL weight (``value``: the config's encoders; another: fitted here, see ``encoders``); targets: the world
    CLIP's target caches of those stage-1 fits (default: the data's ``targets/``); stage1_overrides: their CLI
    overrides (epochs, validation) after the ``--data.init_args`` ones of ``overrides``."""

    out_dir: Path
    configs: list[Path] = field(default_factory=lambda: list(STAGE2_WORLD))
    kl_weights: tuple[float, ...] | None = None
    overrides: list[str] = field(default_factory=list)
    bootstrap: int = 200
    scorings: tuple[str, ...] = ("value", "unit", "dense")
    targets: Path | None = None
    stage1_overrides: list[str] = field(default_factory=list)

    def weights(self) -> tuple[float, ...]:
        return tuple(self.kl_weights) if self.kl_weights else (0.0, default_kl_weight())


def run_name(kl_weight: float, scoring: str = "value") -> str:
    """``kl_<w>`` on the reference router's encoders, ``kl_<w>_<scoring>`` on another's."""
    return f"kl_{kl_weight:g}" + ("" if scoring == "value" else f"_{scoring}")


def _config(study: TemporalStudy) -> dict[str, Any]:
    from experiments._config import load_config

    return load_config([str(c) for c in study.configs], study.overrides)


def encoders(study: TemporalStudy, scoring: str) -> list[str]:
    """The stage-1 encoder overrides of the runs on ``scoring``'s encoders: none for ``value`` (the config's);
    else those encoders, fitted (or read back) under ``out_dir/stage1`` for the stage-2 stack's branches."""
    if scoring == "value":
        return []
    config = _config(study)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    wanted = tuple(t for t, b in (("clip_image", "image_branch"), ("clip_text", "text_branch")) if model.get(b))
    data_overrides = [o for o in study.overrides if o.startswith("--data.init_args.") and ".targets" not in o]
    fitted = fit_world_encoders(Path(study.out_dir) / "stage1", Path(data["data_dir"]), list(data["subjects"]),
                                study.targets, Path(model["sdxl_dir"]), scoring, wanted,
                                extra=[*data_overrides, *study.stage1_overrides])
    return [f"--model.init_args.{ENCODER_OPTION[t]}={path}" for t, path in fitted.items()]


def _args(study: TemporalStudy, name: str, kl_weight: float | None, encoder_args: list[str] | None = None
          ) -> list[str]:
    return [*cli_args(study.configs, Path(study.out_dir), name), *study.overrides, *(encoder_args or []),
            *([f"--model.init_args.kl_weight={kl_weight}"] if kl_weight is not None else [])]


def fit_run(study: TemporalStudy, kl_weight: float, scoring: str = "value", encoder_args: list[str] | None = None
            ) -> Path:
    """Fit stage 2 at ``kl_weight`` into ``out/<run_name>/run`` (skipped when its last checkpoint exists and was
    fitted from the same inputs, ``step_inputs``)."""
    from experiments.run import cli_main
    from experiments.studies.step_inputs import start_step

    name = run_name(kl_weight, scoring)
    args = _args(study, name, kl_weight, encoder_args)
    directory = run_dir(Path(study.out_dir), name)
    start_step(directory, args)
    checkpoint = directory / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        cli_main(["fit", *args])
    return checkpoint


@torch.no_grad()
def router_arrays(module) -> dict[str, np.ndarray]:
    """The module's routers at every timestep (``temporal_arrays``) -> per branch ``probs`` (T, L), ``target``
    (T, L), plus ``timesteps`` (T,)."""
    from experiments.interpretability.temporal_routing import temporal_arrays

    arrays = temporal_arrays(module)
    missing = [b for b in module.branches if f"{b}_probs" not in arrays]
    if missing:
        from experiments.interpretability.loading import InterpretabilityInputError

        raise InterpretabilityInputError(
            f"--config: branch(es) {', '.join(missing)} have no learned temporal router (this study compares "
            "temporal: soft or hard): change the config's *_branch.temporal")
    return arrays


def untrained_arrays(study: TemporalStudy) -> dict[str, np.ndarray]:
    """The routers every fit starts from: the module built (seeded) by the CLI from the same stack, not trained."""
    from experiments.run import cli_main

    cli = cli_main(_args(study, UNTRAINED, None), run=False)
    cli.model.configure_model()
    return router_arrays(cli.model.eval())


def fitted_arrays(study: TemporalStudy, checkpoint: Path, kl_weight: float, encoder_args: list[str] | None = None
                  ) -> dict[str, np.ndarray]:
    """The routers of a fitted run, rebuilt from the study's stack and loaded from ``checkpoint``."""
    from experiments.interpretability.stage2_loading import load_stage2_run

    overrides = [*study.overrides, *(encoder_args or []), f"--model.init_args.kl_weight={kl_weight}"]
    return router_arrays(load_stage2_run(checkpoint, [str(c) for c in study.configs], overrides).model)


def curve_summary(probs: np.ndarray, target: np.ndarray, timesteps: np.ndarray) -> dict[str, float]:
    """(T, L) router softmax, (T, L) KL target, (T,) -> mean KL(router || target), Spearman rho of the expected
    level with t (router and target), and the expected level at the least and the most noisy tenth of steps."""
    from scipy.stats import spearmanr

    from lightning_modules.components.level_prior import level_kl

    levels = np.arange(probs.shape[1])
    expected, expected_target = probs @ levels, target @ levels
    tenth = max(1, len(timesteps) // 10)
    return {"kl_to_target": float(level_kl(torch.from_numpy(probs), torch.from_numpy(target))),
            "spearman_level_vs_t": float(np.nan_to_num(spearmanr(expected, timesteps).statistic)),
            "target_spearman_level_vs_t": float(spearmanr(expected_target, timesteps).statistic),
            "expected_level_clean": float(expected[:tenth].mean()),
            "expected_level_noisy": float(expected[-tenth:].mean())}


def reconstruction_metrics(study: TemporalStudy, checkpoint: Path, name: str,
                           encoder_args: list[str] | None = None) -> dict[str, Any]:
    """Test reconstructions of a fitted run (``predict``) scored by the evaluation suite with the world's CLIP:
    {"values": mean over subjects, "intervals": 95% bootstrap of the mean, "subjects": per subject}."""
    from experiments.studies.reconstruction_rows import evaluate_rows, predict_rows

    config = _config(study)
    data_dir, subjects = config["data"]["init_args"]["data_dir"], config["data"]["init_args"]["subjects"]
    clip = str(Path(config["model"]["init_args"]["sdxl_dir"]) / "image_encoder")
    recon = predict_rows(_args(study, name, None, encoder_args), checkpoint, Path(study.out_dir), name, "test",
                         {"brain": []})
    results = evaluate_rows(Path(data_dir), recon, list(subjects), clip, study.bootstrap)["brain"]
    mean = results[-1]
    return {"values": mean.values, "intervals": {k: list(v) for k, v in mean.intervals.items()},
            "num_images": mean.num_images, "subjects": {r.subject: r.values for r in results[:-1]}}


def run_study(study: TemporalStudy, log=print) -> dict[str, Any]:
    """Untrained routers, one fit per KL weight, their curves and reconstructions; writes the results (see
    ``write_outputs``) and returns the record."""
    runs: dict[str, dict[str, Any]] = {}
    arrays = {UNTRAINED: untrained_arrays(study)}
    for scoring in study.scorings:
        if scoring != "value":
            log(f"temporal router study: stage-1 encoders with the {scoring} router")
        encoder_args = encoders(study, scoring)
        for weight in study.weights():
            name = run_name(weight, scoring)
            log(f"temporal router study: fit {name}")
            checkpoint = fit_run(study, weight, scoring, encoder_args)
            arrays[name] = fitted_arrays(study, checkpoint, weight, encoder_args)
            runs[name] = {"kl_weight": weight, "scoring": scoring, "checkpoint": str(checkpoint),
                          "reconstructions": reconstruction_metrics(study, checkpoint, name, encoder_args)}
    runs = {UNTRAINED: {"kl_weight": None, "scoring": None}, **runs}
    branches = [k[: -len("_probs")] for k in arrays[UNTRAINED] if k.endswith("_probs")]
    t = arrays[UNTRAINED]["timesteps"]
    for name, a in arrays.items():
        runs[name]["routers"] = {b: curve_summary(a[f"{b}_probs"], a[f"{b}_target"], t) for b in branches}
    record = {"study": "temporal_router_vs_prior", "branches": branches, "runs": runs,
              "scorings": list(study.scorings),
              "configs": [str(c) for c in study.configs], "overrides": list(study.overrides),
              "provenance": provenance()}
    from experiments.studies.kl_guidance_outputs import write_outputs

    write_outputs(record, arrays, Path(study.out_dir))
    return record
