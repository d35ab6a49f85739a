"""``build_once``, which keeps per-node ``prepare_data`` from writing a shared cache twice."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from datamodules.build_once import LOCK_SUFFIX, build_once
from datamodules.common import HOST, DataFormatError


# ----------------------------------------------------------------------------------------- build_once
def _lock(path: Path, **record) -> Path:
    lock = path.with_name(path.name + LOCK_SUFFIX)
    lock.write_text(json.dumps({"host": HOST, "pid": os.getppid(), "started": "then", **record}))
    return lock


def test_build_once_waits_for_a_live_holder_and_never_builds(tmp_path):
    """A lock of a live process on this host (the parent of the test process): this process builds nothing and
    returns once the holder's file appears."""
    target = tmp_path / "shard.tar"
    _lock(target)
    threading.Timer(0.3, target.write_text, ("built elsewhere",)).start()
    built = []
    assert build_once(target, built.append, poll_s=0.05) == target
    assert built == [] and target.read_text() == "built elsewhere"


def test_build_once_waits_for_another_node_of_the_same_slurm_run(tmp_path, monkeypatch):
    """A lock taken on another host by the same Slurm job and restart (a sibling node): waited for, never taken
    over; the wait ends after timeout_s with an error naming the lock."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    target = tmp_path / "shard.tar"
    lock = _lock(target, host="node-b", pid=1, slurm_job_id="777", slurm_restart="1")
    with pytest.raises(DataFormatError, match=f"{lock.name} is held by pid 1 on node-b"):
        build_once(target, lambda p: p.write_text("x"), timeout_s=0.3, poll_s=0.05)
    assert lock.exists() and not target.exists()


@pytest.mark.parametrize("holder", [{"host": "node-b", "pid": 1, "slurm_job_id": "777", "slurm_restart": "0"},
                                    {"pid": 2 ** 22 + 1}])
def test_build_once_takes_over_an_abandoned_lock(tmp_path, monkeypatch, holder):
    """The lock of this Slurm job before its requeue (restart 0, now 1), or of a dead pid on this host: taken over,
    the file built once by this process, the lock gone."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    target = tmp_path / "shard.tar"
    lock = _lock(target, **holder)
    built = []
    build_once(target, lambda p: (built.append(p), p.write_text("x")), timeout_s=5)
    assert built == [target] and target.read_text() == "x" and not lock.exists()
