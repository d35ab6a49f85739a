"""Data-loader benchmark: our training loader against a bare webdataset decode loop over the same shards.

Both sides decode every sample's voxels (float16 -> float32 tensor), image (PNG -> float tensor in [0, 1]) and
JSON, in the same process, so the ratio measures what our pipeline adds (resampling, filtering, shuffling,
batching, collation). Peak memory is measured in fresh subprocesses for 1, 4 and 8 sessions.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from datamodules.common import provenance
from datamodules.nsd import NSDDataModule
from datamodules.synthetic import SyntheticNSDConfig, generate

BENCH_CONFIG = SyntheticNSDConfig(seed=0, voxels=(16384,), num_sessions=8, trials_per_session=150,
                                  num_test_images=20, image_size=224)


def make_bench_data(root: Path) -> Path:
    """The benchmark subject (16k voxels, 224 px, 8 sessions), generated once."""
    if not (root / "subj01" / "meta.json").exists():
        generate(BENCH_CONFIG, root)
    return root


def bare_loop(urls: list[str], num_samples: int) -> float:
    """Samples/s of a plain ``WebDataset(...).decode`` loop that converts each sample to tensors."""
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
    start, n = time.perf_counter(), 0
    while n < num_samples:
        for sample in dataset:
            torch.from_numpy(sample["voxels.npy"].astype(np.float32))
            torch.from_numpy(np.array(sample["image.png"])).permute(2, 0, 1).float().div_(255.0)
            n += 1
            if n == num_samples:
                break
    return n / (time.perf_counter() - start)


def datamodule_loop(root: Path, num_samples: int, sessions: int | None = None, batch_size: int = 24,
                    num_workers: int = 0) -> float:
    """Samples/s of ``NSDDataModule.train_dataloader`` on one rank."""
    dm = NSDDataModule(str(root), subjects=["subj01"], num_sessions=sessions, batch_size=batch_size,
                       num_workers=num_workers, val_images=0, samples_per_epoch=num_samples, shuffle_buffer=500)
    dm.setup("fit")
    loader = dm.train_dataloader()
    start, n = time.perf_counter(), 0
    for batch, _, _ in loader:
        n += len(batch["subj01"]["nsd_id"])
    return n / (time.perf_counter() - start)


def vm_hwm_mb() -> float:
    """Peak resident memory of this process (``VmHWM``; unlike ``ru_maxrss`` it is not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(root: Path, sessions: int, num_samples: int) -> float:
    """Peak resident memory (MB) of a fresh process that runs the loader over ``sessions`` sessions."""
    code = (f"from pathlib import Path; from experiments.benchmarks.data_loader import datamodule_loop, vm_hwm_mb; "
            f"datamodule_loop(Path({str(root)!r}), {num_samples}, sessions={sessions}); print(vm_hwm_mb())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    return float(out.stdout.strip().splitlines()[-1])


def run(root: Path, num_samples: int = 960, repeats: int = 3) -> dict[str, Any]:
    """Best-of-``repeats`` throughput of both loops (single process) and peak memory against sessions."""
    make_bench_data(root)
    meta = json.loads((root / "subj01" / "meta.json").read_text())
    urls = [str(root / "subj01" / s["shard"]) for s in meta["sessions"]]
    bare = max(bare_loop(urls, num_samples) for _ in range(repeats))
    ours = max(datamodule_loop(root, num_samples) for _ in range(repeats))
    memory = {s: peak_rss_mb(root, s, num_samples) for s in (1, 4, 8)}
    return {
        "benchmark": "train_loader_vs_bare_webdataset",
        "data": {"voxels": 16384, "image_size": 224, "image_format": "png", "sessions": 8,
                 "trials_per_session": 150, "samples_timed": num_samples, "batch_size": 24},
        "bare_samples_per_s": round(bare, 1),
        "ours_samples_per_s": round(ours, 1),
        "ratio_ours_over_bare": round(ours / bare, 3),
        "target_ratio": 0.8,
        "peak_rss_mb_by_sessions": {str(k): round(v, 1) for k, v in memory.items()},
        "peak_rss_ratio_8_over_1_sessions": round(memory[8] / memory[1], 3),
        "threads": torch.get_num_threads(),
        "provenance": provenance(),
    }
