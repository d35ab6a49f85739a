"""Two nodes over loopback: one array task of a stage-1 sweep run by two processes with the environment ``srun``
gives the tasks of ``--nodes=2 --ntasks-per-node=1`` (Lightning's SLURMEnvironment), sharing one file system;
and ``build_once``, which keeps per-node ``prepare_data`` from writing a shared cache twice."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from datamodules.build_once import LOCK_SUFFIX, build_once
from datamodules.common import HOST, DataFormatError
from tests.test_ddp_data import REPO
from tests.test_ddp_stage1 import single_process_retrieval

VAL_IMAGES = 6  # 210 - 6 x 3 repeats = 192 training trials per subject = 6 batches of 16 on each of 2 ranks
SUBJECTS = ("subj01", "subj02")


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


# ----------------------------------------------------------------------------------------- two nodes
def slurm_port() -> tuple[str, int]:
    """A Slurm job id whose port (Lightning: 15000 + its last 4 digits) is free on loopback."""
    for port in range(15000 + os.getpid() % 9000, 25000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return f"9{port - 15000:04d}", port
    raise RuntimeError("no free port in 15000-24999")


def node_env(node: int, job_id: str, events: Path) -> dict[str, str]:
    """What srun gives task ``node`` of ``--nodes=2 --ntasks-per-node=1`` (array task 0), without MASTER_*: the
    SLURMEnvironment derives the address from the node list and the port from the job id."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MASTER_", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MULTINODE_EVENTS": str(events),
            "MULTINODE_WRITE_DELAY_S": "1.0", "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "fit_array.sbatch",
            "SLURM_ARRAY_JOB_ID": job_id, "SLURM_ARRAY_TASK_ID": "0", "SLURM_NNODES": "2",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_PROCID": str(node),
            "SLURM_NODEID": str(node), "SLURM_LOCALID": "0", "SLURM_CPUS_PER_TASK": "1"}


@pytest.fixture(scope="module")
def two_nodes(small_data, targets, tmp_path_factory) -> dict:
    """One sweep task (the tiny stage-1 config with configs/base/slurm.yaml, both subjects, an exact-pass epoch,
    2 epochs) run by two 'nodes' sharing one validation cache directory and one run directory."""
    from experiments.slurm.sweeps import stage1_sweep

    tmp = tmp_path_factory.mktemp("multinode")
    probe, events, val_cache = tmp / "probe", tmp / "events.jsonl", tmp / "shared_val_cache"
    extra = [f"--data.init_args.data_dir={small_data}", f"--data.init_args.subjects=[{', '.join(SUBJECTS)}]",
             f"--data.init_args.val_images={VAL_IMAGES}", f"--data.init_args.val_cache_dir={val_cache}",
             "--data.init_args.train_sampling=epoch", "--trainer.accelerator=cpu", "--trainer.max_epochs=2",
             "--trainer.check_val_every_n_epoch=1",
             "--trainer.callbacks+=tests.helpers.multinode_probe.NodeProbe", f"--trainer.callbacks.out={probe}"]
    sweep = stage1_sweep("tiny", ["subj01"], ["text"], str(tmp / "logs"), "mn_stage1", extra)
    path = sweep.write()
    job_id, _ = slurm_port()
    cmd = ["timeout", "-k", "10", "300", sys.executable, "-m", "tests.helpers.multinode_probe", str(path)]
    logs = [open(tmp / f"node{n}.log", "w") for n in (0, 1)]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=node_env(n, job_id, events), stdout=log, stderr=subprocess.STDOUT)
             for n, log in enumerate(logs)]
    codes = [node.wait(timeout=360) for node in nodes]
    for log in logs:
        log.close()
    assert codes == [0, 0], "\n".join((tmp / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    return {"run": Path(sweep.run_dir(0)), "val_cache": val_cache,
            "ranks": [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)],
            "events": [json.loads(line) for line in events.read_text().splitlines()]}


@pytest.mark.slow
@pytest.mark.ddp
def test_two_nodes_run_under_the_slurm_environment_and_split_the_epoch_exactly(two_nodes, small_data):
    """SLURMEnvironment gives ranks 0 and 1 on nodes 0 and 1; in each epoch the two nodes train on 96 trials of
    each subject each, together every training trial (session, nsd_id) exactly once and no (session, trial) twice."""
    from datamodules import NSDDataModule

    ranks = two_nodes["ranks"]
    assert [(r["environment"], r["global_rank"], r["node_rank"], r["local_rank"], r["world_size"]) for r in ranks] \
        == [("SLURMEnvironment", 0, 0, 0, 2), ("SLURMEnvironment", 1, 1, 0, 2)]
    dm = NSDDataModule(str(small_data), subjects=list(SUBJECTS), val_images=VAL_IMAGES)
    for subject in SUBJECTS:
        excluded = set(dm.val_ids(subject))
        training = Counter((x["session"], i) for x in dm.metas[subject]["sessions"] for i in x["nsd_ids"]
                           if i not in excluded)
        assert sum(training.values()) == dm.train_trials(subject) == 192
        for epoch in ("0", "1"):
            per_node = [[tuple(t) for t in r["trials"][epoch][subject]] for r in ranks]
            assert len(per_node[0]) == len(per_node[1]) == 96
            both = per_node[0] + per_node[1]
            assert len({(session, trial) for session, trial, _ in both}) == len(both)  # no trial twice
            assert Counter((session, nsd_id) for session, _, nsd_id in both) == training  # every training trial


@pytest.mark.slow
@pytest.mark.ddp
def test_two_node_validation_equals_a_single_process_computation(two_nodes, small_data):
    """The last validation's top-1 that both nodes hold (and rank 0 logged) equals the same retrieval computed in
    one process from the final checkpoint over the 6 validation images (3 on each node)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, ranks = two_nodes["run"], two_nodes["ranks"]
    assert ranks[0]["validations"] == ranks[1]["validations"] and len(ranks[0]["validations"]) == 2
    events = EventAccumulator(str(run)).Reload()
    expected = single_process_retrieval(run / "checkpoints" / "last.ckpt", small_data, two_nodes["val_cache"],
                                        VAL_IMAGES)
    for subject in SUBJECTS:
        assert [e.value for e in events.Scalars(f"val/{subject}/candidates")] == [float(VAL_IMAGES)] * 2
        for metric, value in zip(("fwd_top1", "bwd_top1"), expected[subject]):
            assert events.Scalars(f"val/{subject}/{metric}")[-1].value == pytest.approx(value, abs=1e-6)
            assert ranks[1]["validations"][-1][f"val/{subject}/{metric}"] == pytest.approx(value, abs=1e-6)


@pytest.mark.slow
@pytest.mark.ddp
def test_prepare_data_runs_once_per_node_and_one_node_writes_the_shared_cache(two_nodes):
    """prepare_data on local rank 0 of each node (Lightning's per-node default); both ask for the same two
    validation shards in the shared directory at once (each write held 1 s), and each is written exactly once."""
    events = two_nodes["events"]
    assert sorted((e["rank"], e["node"]) for e in events if e["event"] == "prepare_data") == [(0, 0), (1, 1)]
    writes = [e["path"] for e in events if e["event"] == "write_shard"]
    assert len(writes) == len(set(writes)) == len(SUBJECTS)
    shards = sorted(two_nodes["val_cache"].rglob("*"))
    assert [p.name for p in shards if p.is_file()] == [Path(w).name for w in sorted(writes)]
    assert not any(p.name.endswith((LOCK_SUFFIX, ".tmp")) for p in shards)


@pytest.mark.slow
@pytest.mark.ddp
def test_checkpoints_and_logs_are_written_once_by_global_rank_zero(two_nodes):
    """Every checkpoint save happens on rank 0; the shared run directory holds one set of checkpoints (best,
    the latest epoch, last -> latest), one TensorBoard event file, and no temporaries or lock left behind."""
    run, events = two_nodes["run"], two_nodes["events"]
    saves = [e for e in events if e["event"] == "save_checkpoint"]
    assert saves and {e["rank"] for e in saves} == {0}
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt", "latest-epoch=001.ckpt"]
    assert os.readlink(checkpoints / "last.ckpt") == "latest-epoch=001.ckpt"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    leftovers = [p for p in run.rglob(".*") if p.is_file()]
    assert leftovers == [], leftovers
