"""Slurm benchmark: wall time of a local array round trip (submit -> every task done) for the tiny stage-1 config.

    python -m experiments.bench --only slurm      # not in the default list: it starts Slurm daemons (root)

A throwaway single-node cluster (``local_cluster.LocalSlurm``) runs the stage-1 array that ``make slurm-stage1
PROFILE=tiny`` submits (same sweep, sbatch call and batch script), on a small synthetic dataset with tiny models,
CPU, one core per task. Beside it in the same run: an empty array of the same size (``srun true``: the scheduler's
own overhead) and one task's command run directly, without Slurm (the work of one task).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from datamodules.synthetic import SyntheticNSDConfig, generate, simulate
from experiments.slurm import jobs
from experiments.slurm.local_cluster import LocalSlurm, ensure_installed
from experiments.slurm.sweeps import Resources, Submission, run_plan, stage1_sweep

REPO = Path(__file__).resolve().parents[2]
# the test suite's small dataset (tests/conftest.py SMALL): 3 subjects of 240-360 voxels, 3 sessions of 90 trials
DATA_CONFIG = SyntheticNSDConfig(seed=3, voxels=(300, 240, 360), num_sessions=3, trials_per_session=90,
                                 num_test_images=20, image_size=32)


def make_tiny_data(root: Path) -> Path:
    """The small synthetic dataset with tiny-model text and image targets under ``root/data`` (generated once)."""
    from experiments.caching.targets import cache_targets
    from experiments.world.tiny_models import make_tiny_clip, make_tiny_sdxl

    data, models = root / "data", root / "tiny_models"
    if not (data / "targets" / "clip_text").exists():
        generate(DATA_CONFIG, data, simulate(DATA_CONFIG))
        make_tiny_sdxl(make_tiny_clip(models, embed_dim=32, image_size=32))
        cache_targets(data, [1, 2, 3], data / "targets", image_model=str(models / "image_encoder"),
                      text_model=str(models))
    return data


def tiny_overrides(data: Path, logs: Path, epochs: int) -> list[str]:
    return [f"--data.init_args.data_dir={data}", "--data.init_args.num_workers=0", "--data.init_args.val_images=8",
            f"--data.init_args.val_cache_dir={logs / 'val_cache'}", "--data.init_args.samples_per_epoch=96",
            "--trainer.accelerator=cpu", f"--trainer.max_epochs={epochs}", "--trainer.check_val_every_n_epoch=1"]


def _task_seconds(record: dict[str, str]) -> float:
    return (jobs.timestamp(record["EndTime"]) - jobs.timestamp(record["StartTime"])).total_seconds()


def slurm_round_trip(work: str | Path = "data/bench", subjects: tuple[str, ...] = ("subj01", "subj02"),
                     target: str = "text", epochs: int = 2, timeout: float = 600) -> dict[str, Any]:
    """Submit the tiny stage-1 array (one task per subject) to a fresh local Slurm and time submit -> all done."""
    work = Path(work).resolve() / "slurm"
    installed = ensure_installed()
    data = make_tiny_data(work)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = work / f"runs-{stamp}"
    resources = Resources(devices=1, gpus=0, cpus=1, time="00:30:00")
    sweep = stage1_sweep("tiny", list(subjects), [target], str(logs), "bench_stage1",
                         tiny_overrides(data, logs, epochs))
    load_before = round(os.getloadavg()[0], 2)
    with LocalSlurm(work / f"cluster-{stamp}") as cluster:
        env = cluster.env
        # the scheduler alone: an array of the same size whose tasks do nothing
        t0 = time.perf_counter()
        empty = subprocess.run(["sbatch", "--parsable", f"--array=0-{len(subjects) - 1}", "--cpus-per-task=1",
                                f"--output={logs}/empty-%A_%a.out", "--wrap", "srun true"], env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        jobs.wait_for([empty], env, timeout=timeout, poll=0.1)
        empty_s = time.perf_counter() - t0
        # the array of tiny stage-1 fits, submitted as `make slurm-stage1 PROFILE=tiny` does
        t0 = time.perf_counter()
        ids = run_plan([Submission("STAGE1_JOB", sweep, list(range(len(sweep.tasks))))], resources, sys.executable,
                       str(REPO), env=env, out=lambda _: None)
        records = jobs.wait_for([ids["STAGE1_JOB"]], env, timeout=timeout, poll=0.1)
        round_trip_s = time.perf_counter() - t0
        version = cluster.version()
    failed = [r["JobId"] for r in records if jobs.state(r) != "COMPLETED"]
    if failed:
        raise RuntimeError(f"array tasks {failed} did not complete; see {logs / 'bench_stage1'}/slurm-*.out")
    # one task's command without Slurm (same interpreter, one thread as in the job)
    direct_logs = logs / "direct"
    direct = stage1_sweep("tiny", [subjects[0]], [target], str(direct_logs), "bench_direct",
                          tiny_overrides(data, direct_logs, epochs))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.slurm.task", str(direct.write()), "--index", "0"], cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=timeout)
    direct_s = time.perf_counter() - t0
    tasks = {r["ArrayTaskId"]: r for r in records}
    return {
        "benchmark": "slurm_array_round_trip",
        "config": {"profile": "tiny", "stage": 1, "tasks": len(subjects), "subjects": list(subjects),
                   "target": target, "epochs": epochs, "samples_per_epoch": 96, "devices": 1, "cpus_per_task": 1,
                   "node_cpus": os.cpu_count(), "accelerator": "cpu"},
        "slurm": {"version": version, "install": installed, "debian": _debian(), "kernel": platform.release()},
        "round_trip_s": round(round_trip_s, 2),
        "task_run_s": {k: _task_seconds(r) for k, r in sorted(tasks.items())},
        "baselines": {"empty_array_round_trip_s": round(empty_s, 2),
                      "one_task_without_slurm_s": round(direct_s, 2)},
        "round_trip_minus_direct_task_s": round(round_trip_s - direct_s, 2),
        "load_before": load_before,
        "note": "tasks run concurrently (one core each, so they contend for the node with each other and any other "
                "load); the round trip includes Python start-up, data setup and "
                "the fits; the empty array is the scheduler's share",
        "logs": str(logs),
    }


def _debian() -> str:
    path = Path("/etc/debian_version")
    return path.read_text().strip() if path.exists() else "unknown"
