"""Runs the evaluation of reconstructions against a subject's test images: which metrics can run (weights given or
skipped), the two streaming passes, retrieval and the bootstrap.

Per subject: pass 1 runs the feature networks on the ground-truth images (kept for two-way identification and the
correlation distances, DreamSim embeddings); pass 2 reads the reconstructions batch by batch, scores the pairs
(PixCorr, SSIM, LPIPS, correlation distances, DreamSim) and fills the two-way matrices. Networks are built once
and shared by all subjects. Nothing looks at more than one reconstruction per image and nothing chooses among
samples by their similarity to the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from datamodules.shard_format import subject_name
from experiments.evaluation import bootstrap as B
from experiments.evaluation.dreamsim_distance import (
    DreamSimDistance,
    dreamsim_distance,
    package_missing,
)
from experiments.evaluation.inputs import (
    EvaluationInputError,
    ImageSet,
    find_reconstructions,
    load_embeddings,
    load_test_images,
    test_ids,
)
from experiments.evaluation.low_level import low_level_metrics
from experiments.evaluation.lpips_distance import LPIPSDistance
from experiments.evaluation.networks import NETWORKS, FeatureNetwork
from experiments.evaluation.paired_scores import PAIRED_SCORES, PairedScore
from experiments.evaluation.preprocessing import to_eval_size
from experiments.evaluation.retrieval import retrieval_mindeye2
from experiments.evaluation.two_way import TwoWayIdentification

__all__ = ["METRICS", "EvaluationConfig", "EvaluationInputError", "Evaluator", "MetricInfo", "SubjectResult",
           "WEIGHT_OPTIONS", "evaluate", "mean_over_subjects", "skip_reasons"]


@dataclass(frozen=True)
class MetricInfo:
    key: str
    label: str
    percent: bool  # reported in % (two-way identification, retrieval), as the papers do
    higher_is_better: bool
    needs: str | None  # a weights key, "embeddings", or None
    kind: str  # low_level, two_way, identification, correlation_distance, cosine, retrieval, lpips, dreamsim
    description: str


METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("pixcorr", "PixCorr", False, True, None, "low_level",
               "Pearson r of the 3 x 425 x 425 pixels, per image"),
    MetricInfo("ssim", "SSIM", False, True, None, "low_level", "skimage SSIM of rgb2gray at 425 px, Gaussian sigma 1.5"),
    MetricInfo("alexnet2", "Alex(2)", True, True, "alexnet", "two_way", "AlexNet features.4, two-way identification"),
    MetricInfo("alexnet5", "Alex(5)", True, True, "alexnet", "two_way", "AlexNet features.11, two-way identification"),
    MetricInfo("inception", "Incep", True, True, "inception", "two_way", "InceptionV3 avgpool, two-way identification"),
    MetricInfo("clip", "CLIP", True, True, "clip", "two_way", "CLIP ViT-L/14 image embeds, two-way identification"),
    MetricInfo("clip_top1", "CLIP top-1", True, True, "clip", "identification",
               "CLIP image embeds: the reconstruction correlates best with its own image among all N test images "
               "(N-way identification, chance 1/N)"),
    MetricInfo("clip_cosine", "CLIP cos", False, True, "clip", "cosine",
               "CLIP image embeds: cosine of each reconstruction with its own image (the bottleneck analyses' CLIP-Cos)"),
    MetricInfo("effnet", "Eff", False, False, "effnet", "correlation_distance",
               "EfficientNet-B1 avgpool, mean correlation distance"),
    MetricInfo("swav", "SwAV", False, False, "swav", "correlation_distance",
               "SwAV ResNet-50 avgpool, mean correlation distance"),
    MetricInfo("image_retrieval", "Img ret", True, True, "embeddings", "retrieval",
               "top-1 of 300 over 30 draws, per image among brain embeddings (MindEye2 'fwd')"),
    MetricInfo("brain_retrieval", "Brain ret", True, True, "embeddings", "retrieval",
               "top-1 of 300 over 30 draws, per brain embedding among images (MindEye2 'bwd')"),
    MetricInfo("lpips", "LPIPS", False, False, "alexnet", "lpips", "LPIPS v0.1 AlexNet at 256 px"),
    MetricInfo("dreamsim", "DreamSim", False, False, "dreamsim", "dreamsim", "DreamSim ensemble, 1 - cosine, 224 px"),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
WEIGHT_OPTIONS = {"alexnet": "--alexnet", "inception": "--inception", "clip": "--clip", "effnet": "--effnet",
                  "swav": "--swav", "dreamsim": "--dreamsim", "embeddings": "--embeddings"}


@dataclass
class EvaluationConfig:
    weights: dict[str, str | None] = field(default_factory=dict)  # alexnet, inception, clip, effnet, swav, dreamsim
    embeddings: str | None = None  # stage-1 predict output directory (retrieval)
    metrics: tuple[str, ...] = tuple(m.key for m in METRICS)
    device: str = "cpu"
    batch_size: int = 32
    antialias: bool = False
    bootstrap: int = 1000
    seed: int = 0  # bootstrap resampling
    candidates: int = 300
    draws: int = 30
    retrieval_seed: int = 42
    brain_key: str = "clip_mean"
    image_key: str = "target"
    strict: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRIC_BY_KEY]
        if unknown:
            raise EvaluationInputError(f"--metrics: unknown {unknown}; choose from {list(METRIC_BY_KEY)}")
        unknown = [k for k in self.weights if k not in WEIGHT_OPTIONS or k == "embeddings"]
        if unknown:
            raise EvaluationInputError(f"unknown weights {unknown}; known: {[k for k in WEIGHT_OPTIONS if k != 'embeddings']}")


def skip_reasons(config: EvaluationConfig) -> dict[str, str | None]:
    """Per selected metric: None when it can run, else its cell text ("skipped: set --inception", ...). Under
    ``strict`` any skip is an error naming the options."""
    reasons: dict[str, str | None] = {}
    for key in config.metrics:
        needs = METRIC_BY_KEY[key].needs
        if needs is None:
            reasons[key] = None
        elif needs == "embeddings":
            reasons[key] = None if config.embeddings else "skipped: set --embeddings"
        elif not config.weights.get(needs):
            reasons[key] = f"skipped: set {WEIGHT_OPTIONS[needs]}"
        elif needs == "dreamsim" and package_missing():
            reasons[key] = f"skipped: {package_missing()}"
        else:
            reasons[key] = None
    if config.strict and any(reasons.values()):
        lines = [f"{METRIC_BY_KEY[k].label}: {r.removeprefix('skipped: ')}" for k, r in reasons.items() if r]
        raise EvaluationInputError("--strict: cannot compute every selected metric: " + "; ".join(lines)
                                   + " (or leave the metric out with --metrics)")
    return reasons


@dataclass
class SubjectResult:
    subject: str
    num_images: int
    values: dict[str, float | str]  # metric -> value (in % where the metric is a percentage) or skip reason
    intervals: dict[str, tuple[float, float]]  # metric -> 95% bootstrap interval (same unit)
    replicates: dict[str, np.ndarray]  # metric -> bootstrap replicates (same unit)
    per_image: dict[str, np.ndarray]  # metric -> per-image score (fraction; retrieval: fraction of its draws)
    notes: dict[str, object]
    ids: np.ndarray | None = None  # the nsd_ids of the per-image scores


class Evaluator:
    """Builds the networks of the runnable metrics once; ``subject(...)`` evaluates one subject."""

    def __init__(self, config: EvaluationConfig):
        self.config = config
        self.reasons = skip_reasons(config)
        self.active = [k for k in config.metrics if self.reasons[k] is None]
        device = config.device
        self.networks: dict[str, FeatureNetwork] = {}
        for name, spec in NETWORKS.items():
            if any(m in self.active for m in spec.nodes):
                self.networks[name] = FeatureNetwork(spec, config.weights[name], device)
        self.lpips = LPIPSDistance(config.weights["alexnet"], device=device) if "lpips" in self.active else None
        self.dreamsim = DreamSimDistance(config.weights["dreamsim"], device=device) \
            if "dreamsim" in self.active else None

    def _batches(self, images: ImageSet, n: int):
        bs, device, aa = self.config.batch_size, self.config.device, self.config.antialias
        for start in range(0, n, bs):
            batch = images.batch(start, min(start + bs, n))
            yield start, torch.cat([to_eval_size(image[None], aa) for image in batch]).to(device)

    @staticmethod
    def _with_identification(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """N-way identification reads the same CLIP features as two-way identification."""
        return {**features, "clip_top1": features["clip"], "clip_cosine": features["clip"]} \
            if "clip" in features else features

    def _features(self, images256: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for network in self.networks.values():
            out.update(network(images256, self.config.antialias))
        return out

    @torch.inference_mode()
    def subject(self, data_dir: str | Path, recons_dir: str | Path, subject: str | int, single_subject: bool = True,
                ) -> SubjectResult:
        cfg, active = self.config, self.active
        name = subject_name(subject)
        ids, gt_images = load_test_images(data_dir, name)
        paths, notes = find_reconstructions(recons_dir, name, ids, single_subject)
        gt, rec, n = ImageSet(images=gt_images), ImageSet(paths=paths), len(ids)
        accumulators = {m: (PairedScore(METRIC_BY_KEY[m].kind) if METRIC_BY_KEY[m].kind in PAIRED_SCORES
                            else TwoWayIdentification())
                        for m in active if METRIC_BY_KEY[m].kind in ("two_way", "identification", *PAIRED_SCORES)}
        per_pair: dict[str, list[torch.Tensor]] = {m: [] for m in active if METRIC_BY_KEY[m].kind in
                                                   ("low_level", "lpips", "dreamsim")}
        gt_dreamsim: list[torch.Tensor] = []
        if accumulators or self.dreamsim is not None:  # pass 1: ground-truth features
            for _, images in self._batches(gt, n):
                for metric, feats in self._with_identification(self._features(images)).items():
                    if metric in accumulators:
                        accumulators[metric].add_reference(feats)
                if self.dreamsim is not None:
                    gt_dreamsim.append(self.dreamsim.embed(images, cfg.antialias))
        gt_dreamsim_all = torch.cat(gt_dreamsim) if gt_dreamsim else None
        needs_pass2 = bool(accumulators or per_pair)
        for start, recons in (self._batches(rec, n) if needs_pass2 else ()):  # pass 2: reconstructions
            stop = start + len(recons)
            truth = None
            if "pixcorr" in per_pair or "ssim" in per_pair or self.lpips is not None:
                truth = torch.cat([to_eval_size(image[None], cfg.antialias) for image in gt.batch(start, stop)]
                                  ).to(cfg.device)
            if "pixcorr" in per_pair or "ssim" in per_pair:
                low = low_level_metrics(truth, recons, cfg.antialias)
                for metric in ("pixcorr", "ssim"):
                    if metric in per_pair:
                        per_pair[metric].append(low[metric].cpu())
            if self.lpips is not None:
                per_pair["lpips"].append(self.lpips(truth, recons))
            if accumulators:
                for metric, feats in self._with_identification(self._features(recons)).items():
                    if metric in accumulators:
                        accumulators[metric].add_candidates(feats)
            if self.dreamsim is not None:
                per_pair["dreamsim"].append(dreamsim_distance(gt_dreamsim_all[start:stop],
                                                              self.dreamsim.embed(recons, cfg.antialias)))
        ratios: dict[str, tuple[np.ndarray, np.ndarray | float]] = {}
        for metric, values in per_pair.items():
            ratios[metric] = (torch.cat(values).double().numpy(), 1.0)
        for metric, acc in accumulators.items():
            ratios[metric] = acc.per_image()
            if METRIC_BY_KEY[metric].kind == "identification":  # first among all N: every distractor beaten
                counts, distractors = ratios[metric]
                ratios[metric] = ((counts == distractors).astype(np.float64), 1.0)
        if "image_retrieval" in active or "brain_retrieval" in active:
            brain, image = load_embeddings(cfg.embeddings, name, ids, cfg.brain_key, cfg.image_key)
            result = retrieval_mindeye2(brain, image, cfg.candidates, cfg.draws, cfg.retrieval_seed, cfg.device)
            ratios["image_retrieval"] = (result.image_correct, result.appearances)
            ratios["brain_retrieval"] = (result.brain_correct, result.appearances)
            notes["retrieval"] = {"candidates": result.candidates, "draws": result.draws,
                                  "embedding_shape": list(brain.shape[1:]), "brain_key": cfg.brain_key,
                                  "image_key": cfg.image_key}
        counts = B.resample_counts(n, cfg.bootstrap, [cfg.seed, _subject_number(name)]) if cfg.bootstrap else None
        values, intervals, replicates, per_image = {}, {}, {}, {}
        for metric in cfg.metrics:
            if self.reasons[metric]:
                values[metric] = self.reasons[metric]
                continue
            num, den = ratios[metric]
            scale = 100.0 if METRIC_BY_KEY[metric].percent else 1.0
            values[metric] = scale * B.ratio(num, den)
            with np.errstate(invalid="ignore", divide="ignore"):  # retrieval: an image never drawn is NaN
                per_image[metric] = np.asarray(num, dtype=np.float64) / np.broadcast_to(den, np.shape(num))
            if counts is not None:
                replicates[metric] = scale * B.bootstrap_replicates(counts, num, den)
                intervals[metric] = B.percentile_interval(replicates[metric])
        notes["nsd_ids"] = {"count": n, "first": int(ids[0]), "last": int(ids[-1])}
        return SubjectResult(name, n, values, intervals, replicates, per_image, notes, ids)


def _subject_number(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def mean_over_subjects(results: list[SubjectResult], metrics: tuple[str, ...]) -> SubjectResult:
    """The mean of each metric over subjects; its interval averages the subjects' bootstrap replicates (each
    subject resampled independently)."""
    values, intervals, replicates = {}, {}, {}
    for metric in metrics:
        cells = [r.values[metric] for r in results]
        skipped = next((c for c in cells if isinstance(c, str)), None)
        if skipped is not None:
            values[metric] = skipped
            continue
        values[metric] = float(np.mean(cells))
        if all(metric in r.replicates for r in results):
            replicates[metric] = np.mean([r.replicates[metric] for r in results], axis=0)
            intervals[metric] = B.percentile_interval(replicates[metric])
    return SubjectResult("mean", sum(r.num_images for r in results), values, intervals, replicates, {},
                         {"subjects": [r.subject for r in results]})


def evaluate(data_dir: str | Path, recons_dir: str | Path, subjects: list[str | int], config: EvaluationConfig,
             log=print) -> list[SubjectResult]:
    """Evaluate every subject; returns the per-subject results followed by the mean over subjects. Inputs are
    checked for every subject before any network is built."""
    reasons = skip_reasons(config)
    for subject in subjects:
        ids = test_ids(data_dir, subject)
        find_reconstructions(recons_dir, subject, ids, single_subject=len(subjects) == 1)
        if any(reasons.get(m) is None for m in ("image_retrieval", "brain_retrieval") if m in reasons):
            load_embeddings(config.embeddings, subject, ids, config.brain_key, config.image_key, check_only=True)
    evaluator = Evaluator(config)
    results = []
    for subject in subjects:
        log(f"evaluating {subject_name(subject)} ...")
        results.append(evaluator.subject(data_dir, recons_dir, subject, single_subject=len(subjects) == 1))
    return results + [mean_over_subjects(results, config.metrics)]
