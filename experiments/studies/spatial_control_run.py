"""The spatial positive control end to end: read, label, test, and check the test with the study's own data.

Per branch and level (``spatial_control`` for the statistic): the learned routing's object-minus-background
retinotopic mass against the permutation null, per denoising-step bin and pooled over steps; and two checks that
use the same masks, labels, image count and null but routing built here: ``random`` (softmax of the learned
router's mean map per step and cell, i.e. its fixed cell preferences, plus per-image noise; no link to the
object) whose false-positive rate over ``calibration`` draws must sit near the nominal level, and ``planted`` (the
first random draw with ``planted_strength`` x coverage of each cell's weight moved to the retinotopic experts)
which the test must detect. Whether the learned router passes is the empirical question; these two say the
test could tell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import provenance
from experiments.studies import spatial_control as sc
from experiments.studies.spatial_control_inputs import expert_labels, object_coverage, read_routing

ALPHA = 0.05


@dataclass
class SpatialStudy:
    """predict_dir: a stage-2 ``predict`` output (``<subject>/routing/*.npz``); data_dir: the synthetic dataset;
    encoders: {branch: stage-1 checkpoint}; subjects: those of the predict output to use (default all);
    permutations / calibration (random-routing draws) / bins (step bins) / planted_strength / seed; ig_steps:
    integrated-gradient steps of the experts' voxel maps."""

    out_dir: Path
    predict_dir: Path
    data_dir: Path
    encoders: dict[str, Path]
    subjects: list[str] | None = None
    permutations: int = 1000
    calibration: int = 200
    bins: int = 5
    planted_strength: float = 0.5
    seed: int = 0
    ig_steps: int = 4
    options: dict[str, str] = field(default_factory=lambda: {"image": "--image-encoder", "text": "--text-encoder"})


def summary(result: sc.ControlResult) -> dict[str, Any]:
    lo, hi = np.percentile(result.null, [2.5, 97.5], axis=0)
    return {"observed": float(result.observed_all), "p": result.p_all, "z": result.z_all,
            "null_mean": float(result.null_all.mean()), "null_sd": float(result.null_all.std()),
            "bins": {"observed": result.observed.tolist(), "p": result.p.tolist(), "z": result.z.tolist(),
                     "null_mean": result.null.mean(0).tolist(), "null_lo": lo.tolist(), "null_hi": hi.tolist()}}


def false_positive_rate(rng: np.random.Generator, maps: np.ndarray, retinotopic: np.ndarray,
                        contrast: np.ndarray, perms: np.ndarray, draws: int) -> float:
    """Share of ``draws`` random routings (the learned mean map over steps as bias; no object link) whose pooled
    p-value is <= ``ALPHA``."""
    bias = np.log(maps.mean((0, 1), keepdims=True)[0] + 1e-6)  # (1, G, E)
    one = [np.arange(1)]
    hits = 0
    for _ in range(draws):
        routing = sc.random_routing(rng, (len(maps), 1, *maps.shape[2:]), bias)
        hits += sc.control_test(sc.retinotopic_mass(routing, retinotopic), contrast, perms, one).p_all <= ALPHA
    return hits / max(draws, 1)


def level_record(maps: np.ndarray, retinotopic: np.ndarray, share: np.ndarray, coverage: np.ndarray,
                 contrast: np.ndarray, perms: np.ndarray, bins: list[np.ndarray], study: SpatialStudy,
                 seed: int) -> dict[str, Any]:
    """Learned, random and planted results of one branch and level (maps (N, S, G, E))."""
    rng = np.random.default_rng(seed)
    learned = sc.control_test(sc.retinotopic_mass(maps, retinotopic), contrast, perms, bins)
    bias = np.log(maps.mean(0) + 1e-6)  # (S, G, E): the router's fixed preferences per step and cell
    random = sc.random_routing(rng, maps.shape, bias)
    planted = sc.planted_routing(random, coverage, retinotopic, study.planted_strength)
    return {"experts": int(maps.shape[-1]), "retinotopic": np.flatnonzero(retinotopic).tolist(),
            "low_level_share": [float(s) for s in share],
            "expert_object_minus_background": sc.expert_contrasts(maps, contrast).tolist(),
            "learned": summary(learned),
            "random": summary(sc.control_test(sc.retinotopic_mass(random, retinotopic), contrast, perms, bins)),
            "planted": summary(sc.control_test(sc.retinotopic_mass(planted, retinotopic), contrast, perms, bins)),
            "false_positive_rate": false_positive_rate(rng, maps, retinotopic, contrast,
                                                       perms[: min(len(perms), 200)], study.calibration)}


def run_study(study: SpatialStudy, log=print) -> dict[str, Any]:
    """Read the routing, label the experts, test every branch and level; writes the outputs; returns the record."""
    from experiments.interpretability.loading import InterpretabilityInputError
    from experiments.studies.spatial_control_outputs import write_outputs

    routing = read_routing(Path(study.predict_dir), study.subjects)
    coverage = object_coverage(Path(study.data_dir), routing.nsd_id, routing.grid)
    contrast = sc.contrasts(coverage)
    _, groups = np.unique(routing.subject, return_inverse=True)
    perms = sc.permutations(groups, study.permutations, study.seed)
    bins = sc.step_bins(len(routing.timesteps), study.bins)
    subjects = sorted(set(routing.subject.tolist()))
    branches: dict[str, Any] = {}
    for b_index, (branch, levels) in enumerate(routing.maps.items()):
        option = study.options[branch]
        if branch not in study.encoders:
            raise InterpretabilityInputError(f"{option}: the {branch} branch is routed but has no stage-1 encoder")
        log(f"spatial control: {branch} experts' voxel maps ({study.encoders[branch]})")
        labels = expert_labels(Path(study.encoders[branch]), Path(study.data_dir), subjects, option, study.ig_steps)
        if [len(r) for r in labels.retinotopic] != [m.shape[-1] for m in levels]:
            raise InterpretabilityInputError(
                f"{option}: the encoder's experts per level {[len(r) for r in labels.retinotopic]} differ from "
                f"the routing's {[m.shape[-1] for m in levels]} (not this stage-2 run's encoder?)")
        branches[branch] = {"checkpoint": labels.checkpoint, "label_subjects": labels.subjects, "levels": [
            level_record(maps, labels.retinotopic[lvl], labels.share[lvl], coverage, contrast, perms, bins, study,
                         study.seed + 1 + 100 * b_index + lvl) for lvl, maps in enumerate(levels)]}
    record = {"study": "spatial_routing_positive_control", "predict_dir": str(study.predict_dir),
              "data_dir": str(study.data_dir), "subjects": subjects, "num_images": int(len(routing.nsd_id)),
              "grid": routing.grid, "timesteps": routing.timesteps.tolist(),
              "step_bins": [b.tolist() for b in bins], "permutations": study.permutations,
              "calibration_draws": study.calibration, "alpha": ALPHA, "planted_strength": study.planted_strength,
              "seed": study.seed, "ig_steps": study.ig_steps,
              "object_cells_mean": float((coverage > 0).sum(1).mean()), "branches": branches,
              "provenance": provenance()}
    write_outputs(record, Path(study.out_dir))
    return record
