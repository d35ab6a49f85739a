"""A real two-process CPU DDP (gloo) fit of a counting module: exact batch counts per rank and worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_counting_fit(data: Path, out: Path, *args: str) -> list[dict]:
    """Two-process CPU DDP fit of the counting module (2 loader workers per rank); returns each rank's record."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    cmd = ["timeout", "-k", "10", "240", sys.executable, "-m", "tests.helpers.counting", "--data", str(data),
           "--out", str(out), "--devices", "2", "--num-workers", "2", "--epochs", "2", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_two_worker_fit_on_a_one_session_subject(small_data, tmp_path):
    ranks = run_counting_fit(small_data, tmp_path / "out", "--sessions", "1", "--subjects", "subj01", "subj02",
                             "--batch-size", "4", "--val-images", "7", "--samples-per-epoch", "200")
    expected_batches = 200 // (2 * 4 * 2)  # samples_per_epoch // (sum of batch sizes x world size) = 12

    streams = []
    for info in ranks:
        assert info["world_size"] == 2
        for epoch in (0, 1):
            entries = [e for e in info["train"] if e["epoch"] == epoch]
            assert len(entries) == expected_batches
            for subject in ("subj01", "subj02"):
                workers = [e["subjects"][subject]["worker"] for e in entries]
                assert workers.count(0) == workers.count(1) == expected_batches // 2
                assert all(e["subjects"][subject]["stream_epoch"] == epoch for e in entries)
                assert all(e["subjects"][subject]["n"] == 4 for e in entries)
            streams.append([e["subjects"]["subj01"]["nsd_id"] for e in entries])
    assert len({json.dumps(s) for s in streams}) == 4  # ranks and epochs all draw different sample orders

    for subject in ("subj01", "subj02"):
        per_rank = [[v for v in info["val"] if v["subject"] == subject and v["epoch"] == 0] for info in ranks]
        assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: no rank waits in a collective
        valid = [i for batches in per_rank for v in batches for i, ok in zip(v["nsd_id"], v["valid"]) if ok]
        padded = [ok for batches in per_rank for v in batches for ok in v["valid"] if not ok]
        assert len(valid) == len(set(valid)) == 7 and valid == sorted(valid)
        assert len(padded) == 1  # 7 images on 2 ranks: 4 + 3, one padding copy


@pytest.mark.slow
@pytest.mark.ddp
def test_two_rank_exact_epoch_pass(small_data, tmp_path):
    ranks = run_counting_fit(small_data, tmp_path / "out", "--subjects", "subj01", "--batch-size", "8",
                             "--val-images", "5", "--train-sampling", "epoch")
    for epoch in (0, 1):
        per_rank = [[tuple(t) for e in info["train"] if e["epoch"] == epoch for t in e["subjects"]["subj01"]["trials"]]
                    for info in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) > 0
        both = per_rank[0] + per_rank[1]
        assert len(both) == len(set(both))  # no trial twice in an epoch, across ranks and workers
        assert 195 - 2 * 2 * 8 <= len(both) <= 195  # 210 training trials - 5 validation images x 3, minus the tail
