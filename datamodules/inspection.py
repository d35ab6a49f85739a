"""Read back a prepared dataset: per-subject counts and split-half reliability measured from the shards."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from datamodules.shard_format import INFO_KEY, VOXEL_KEY, load_subject_meta
from datamodules.streams import raise_with_shard
from datamodules.subject_writer import summarise


def repeat_pairs(root: str | Path, subject: str) -> tuple[np.ndarray, np.ndarray]:
    """First and second presentation (n_images, V) of every image shown at least twice, from all shards."""
    meta = load_subject_meta(root, subject)
    shards = [s["shard"] for s in meta["sessions"]] + [s["shard"] for s in meta["test"]["shards"]]
    trials: dict[int, list[tuple[int, np.ndarray]]] = {}
    for raw in wds.tarfile_to_samples(handler=raise_with_shard)([{"url": str(Path(root) / subject / s)}
                                                                 for s in shards]):
        info = json.loads(raw[INFO_KEY])
        voxels = np.load(io.BytesIO(raw[VOXEL_KEY])).astype(np.float32)
        rows = info.get("global_trials", [info.get("global_trial")])
        for row, v in zip(rows, np.atleast_2d(voxels)):
            trials.setdefault(info["nsd_id"], []).append((row, v))
    pairs = [sorted(t, key=lambda x: x[0])[:2] for t in trials.values() if len(t) >= 2]
    return np.stack([p[0][1] for p in pairs]), np.stack([p[1][1] for p in pairs])


def split_half_from_shards(root: str | Path, subject: str) -> np.ndarray:
    """Per-voxel correlation between first and second presentations, (V,)."""
    a, b = repeat_pairs(root, subject)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0) + 1e-12)


def describe_dataset(root: str | Path) -> list[dict[str, Any]]:
    """One row per prepared subject: counts, normalisation, and reliability (responsive voxels when the
    synthetic ROI ground truth is present)."""
    rows = []
    for meta_path in sorted(Path(root).glob("subj*/meta.json")):
        subject = meta_path.parent.name
        meta = load_subject_meta(root, subject)
        rel = split_half_from_shards(root, subject)
        row: dict[str, Any] = {"subject": subject, **summarise(meta),
                               "normalisation": meta["normalisation"]["kind"],
                               "median_split_half_all_voxels": round(float(np.median(rel)), 3)}
        if meta.get("voxel_roi") and "unresponsive" in meta["voxel_roi"]["names"]:  # synthetic ground truth
            labels = np.load(meta_path.parent / meta["voxel_roi"]["labels"])
            responsive = labels != meta["voxel_roi"]["names"].index("unresponsive")
            row["median_split_half_responsive"] = round(float(np.median(rel[responsive])), 3)
            row["split_half_responsive_p10_p90"] = [round(float(q), 3)
                                                    for q in np.percentile(rel[responsive], [10, 90])]
        rows.append(row)
    return rows
