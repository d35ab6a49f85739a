"""Ridge-regression baseline: voxels -> target embedding per subject, the same retrieval metric as stage 1.

Trained on every training trial of the selected sessions except the validation images; the ridge penalty is
chosen on the validation images (never on the test set); test repeats are averaged. With ``rank`` b the map is
reduced-rank ridge (the linear decoder through a width-b bottleneck, V -> b -> D): the ridge's coefficients
projected onto the top-b principal directions of its fitted training targets, the best rank-b map for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from sklearn.linear_model import Ridge

from datamodules.nsd import NSDDataModule
from datamodules.shard_format import decode_sample
from datamodules.streams import raise_with_shard
from datamodules.target_cache import write_target_cache
from lightning_modules.metrics import retrieval_top1

ALPHAS = (1e1, 1e2, 1e3, 1e4, 1e5)


def training_arrays(dm: NSDDataModule, subject: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, V) voxels and (N, D) targets of every training trial (validation images excluded)."""
    held_out, sessions = set(dm.val_ids(subject)), set(dm.sessions(subject))
    urls = [{"url": str(dm.data_dir / subject / s["shard"])} for s in dm.metas[subject]["sessions"]
            if s["session"] in sessions]
    voxels, ids = [], []
    for raw in wds.tarfile_to_samples(handler=raise_with_shard)(urls):
        sample = decode_sample(raw, load_image=False)
        if sample["info"]["nsd_id"] not in held_out:
            voxels.append(sample["voxels"].astype(np.float32))
            ids.append(sample["info"]["nsd_id"])
    return np.stack(voxels), dm.targets[target].lookup(np.array(ids)).reshape(len(ids), -1)


def evaluation_arrays(loader, target: str, with_ids: bool = False) -> tuple[np.ndarray, ...]:
    """Repeat-averaged voxels (N, V) and targets (N, D) of an evaluation loader (padding dropped), and with
    ``with_ids`` their nsd_ids (N,)."""
    voxels, targets, ids = [], [], []
    for batch in loader:
        valid, mask = batch["valid"], batch["repeat_mask"][batch["valid"]].float()
        averaged = (batch["voxels"][valid] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        voxels.append(averaged.numpy())
        targets.append(batch[target][valid].reshape(int(valid.sum()), -1).numpy())
        ids.append(batch["nsd_id"][valid].numpy())
    out = (np.concatenate(voxels), np.concatenate(targets))
    return (*out, np.concatenate(ids)) if with_ids else out


class RankedRidge:
    """Ridge (V -> D) whose coefficients are truncated to ``rank`` (None: full rank): (N, V) -> (N, D)."""

    def __init__(self, alpha: float, rank: int | None = None) -> None:
        self.alpha, self.rank = alpha, rank

    def fit(self, x: np.ndarray, y: np.ndarray) -> RankedRidge:
        self.coef = Ridge(alpha=self.alpha).fit(x, y).coef_.T  # (V, D)
        if self.rank is not None and self.rank < min(self.coef.shape):
            directions = np.linalg.svd((x - x.mean(0)) @ self.coef, full_matrices=False)[2][: self.rank]  # (b, D)
            self.coef = self.coef @ directions.T @ directions
        self.intercept = y.mean(0) - x.mean(0) @ self.coef  # (D,)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef + self.intercept


def ridge_baseline(dm: NSDDataModule, target: str, candidates: int = 300, draws: int = 30,
                   alphas: tuple[float, ...] = ALPHAS, predictions_dir: str | Path | None = None,
                   rank: int | None = None) -> dict[str, dict[str, float]]:
    """Per subject: the chosen alpha and test forward/backward top-1 of a ridge from voxels to ``target`` (of
    ``rank`` at most; None: full). With ``predictions_dir``, the predicted test embeddings are written as a target
    cache per subject (``predictions_dir/subjXX``, keyed by nsd_id): stage 2's ``condition_tables`` read them."""
    dm.prepare_data()
    dm.setup("test")
    results = {}
    for index, subject in enumerate(dm.subjects):
        x, y = training_arrays(dm, subject, target)
        mean = y.mean(0)
        scores = {}
        if dm.val_images:
            xv, yv = evaluation_arrays(dm.val_dataloader()[index], target)
            for alpha in alphas:
                pred = RankedRidge(alpha, rank).fit(x, y - mean).predict(xv) + mean
                scores[alpha] = retrieval_top1(torch.tensor(pred), torch.tensor(yv), candidates, draws)[0]
        alpha = max(scores, key=scores.get) if scores else alphas[len(alphas) // 2]
        xt, yt, ids = evaluation_arrays(dm.test_dataloader()[index], target, with_ids=True)
        pred = RankedRidge(alpha, rank).fit(x, y - mean).predict(xt) + mean
        if predictions_dir is not None:
            write_target_cache(Path(predictions_dir) / subject, ids, pred.astype(np.float32),
                               model=f"ridge (alpha {alpha:g}, rank {rank or 'full'}) from {subject}'s voxels",
                               layer=target,
                               extra={"subjects": [subject], "data_dir": str(dm.data_dir), "target": target})
        fwd, bwd = retrieval_top1(torch.tensor(pred), torch.tensor(yt), candidates, draws)
        results[subject] = {"alpha": alpha, "rank": rank, "fwd_top1": fwd, "bwd_top1": bwd, "candidates": min(candidates, len(yt))}
    return results
