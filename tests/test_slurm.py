"""Slurm arrays: sweep files and sbatch calls (no cluster), then the Makefile's targets against a real single-node
Slurm started by the session fixture (installed with apt-get when missing; a setup failure fails, never skips):
an array of tiny stage-1 fits, a cross-subject transfer that waits (afterok) for its stage-1 task, and (slow) a
SIGUSR1 requeue that resumes from Lightning's hpc checkpoint."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.slurm import jobs, sweeps
from experiments.slurm.sweeps import Resources, plan_for, read_line, sbatch_command
from tests.helpers.slurm_cluster import REPO, SlurmSetupError, diagnostics, make, start_cluster

# ------------------------------------------------------------------------------------------- without a cluster


def args_for(command: str, *argv: str) -> argparse.Namespace:
    return sweeps.parser().parse_args([command, *argv])


def test_array_index_maps_to_one_line_with_a_stable_run_directory(tmp_path):
    sweep = sweeps.stage1_sweep("nsd", ["1", "subj02"], ["image", "text"], str(tmp_path), "x_stage1", ["--trainer.max_epochs=3"])
    assert [sweep.version(i) for i in range(4)] == ["0-subj01-image", "1-subj01-text", "2-subj02-image",
                                                    "3-subj02-text"]
    path = sweep.write()
    assert path.name.startswith("sweep-") and sweep.write() == path  # content-addressed, written once
    line = read_line(path, 3)
    assert line[0] == "fit" and line == sweep.line(3)
    assert line[1:9] == ["--config", "configs/base/trainer.yaml", "--config", "configs/stage1/text_nsd.yaml",
                         "--config", "configs/base/slurm.yaml", "--data.init_args.subjects=[subj02]",
                         "--trainer.max_epochs=3"]
    assert line[-4:] == [f"--trainer.default_root_dir={tmp_path}/x_stage1/3-subj02-text",
                         f"--trainer.logger.init_args.save_dir={tmp_path}",
                         "--trainer.logger.init_args.name=x_stage1", "--trainer.logger.init_args.version=3-subj02-text"]
    assert not any(a.startswith("--ckpt_path") for a in line)  # a requeued task resumes from its hpc_ckpt_*
    with pytest.raises(IndexError):
        read_line(path, 4)
    # the launcher prints what it runs for SLURM_ARRAY_TASK_ID
    result = subprocess.run([sys.executable, "-m", "experiments.slurm.task", str(path), "--print"], cwd=REPO,
                            env={"SLURM_ARRAY_TASK_ID": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert result.returncode == 0 and "[task 1 rank 0 restart 0]" in result.stderr
    assert shlex.join(read_line(path, 1)) in result.stderr


def test_every_generated_line_parses_through_the_real_cli(tmp_path, monkeypatch):
    from experiments.run import cli_main

    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.delenv("SLURM_NNODES", raising=False)
    ns = args_for("pipeline", "--profile", "nsd", "--subjects", "subj01", "--logs", str(tmp_path))
    env_cfgs = {}
    for sub in plan_for("pipeline", ns):
        line = sub.sweep.line(sub.indices[0])
        config = cli_main(line[1:], run=False, instantiate=False).config
        env_cfgs[sub.sweep.experiment] = config
        assert config.trainer.strategy == "ddp" and config.trainer.devices == 1 and config.trainer.num_nodes == 1
        assert config.trainer.enable_progress_bar is False and config.trainer.logger.init_args.version == \
            sub.sweep.version(sub.indices[0])
    stage2 = env_cfgs["nsd_stage2"].model.init_args
    assert stage2.image_encoder == f"{tmp_path}/nsd_stage1/0-subj01-image/checkpoints/best.ckpt"
    assert stage2.text_encoder == f"{tmp_path}/nsd_stage1/1-subj01-text/checkpoints/best.ckpt"
    ns = args_for("bottleneck", "--subjects", "subj01", "--targets", "image", "--b-sizes", "64", "128", "--logs",
                  str(tmp_path))
    (sub,) = plan_for("bottleneck", ns)
    assert [cli_main(sub.sweep.line(i)[1:], run=False, instantiate=False).config.model.init_args.b_size
            for i in sub.indices] == [64, 128]
    ns = args_for("cross-subject", "--new-subjects", "subj05", "--targets", "image", "--logs", str(tmp_path),
                  "--stage1-job", "77", "--dry-run")
    (sub,) = plan_for("cross-subject", ns)
    model = cli_main(sub.sweep.line(0)[1:], run=False, instantiate=False).config.model.init_args
    assert model.init_from == f"{tmp_path}/nsd_stage1/0-subj01-image/checkpoints/last.ckpt"
    assert model.new_subjects == ["subj05"] and sub.after == [("77", 0)]
    ns = args_for("cross-subject", "--new-subjects", "subj05", "--targets", "image", "--logs", str(tmp_path),
                  "--transfer-sessions", "1", "--dry-run")
    (sub,) = plan_for("cross-subject", ns)
    assert cli_main(sub.sweep.line(0)[1:], run=False, instantiate=False).config.data.init_args.num_sessions == 1


def test_slurm_config_takes_devices_and_nodes_from_the_allocation(monkeypatch):
    from experiments._config import load_config

    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    trainer = load_config([str(REPO / "configs/base/trainer.yaml"), str(REPO / "configs/stage1/image_nsd.yaml"),
                           str(REPO / "configs/base/slurm.yaml")])["trainer"]
    assert (trainer["devices"], trainer["num_nodes"], trainer["strategy"]) == (4, 2, "ddp")


def test_sbatch_calls_carry_resources_signal_requeue_and_dependencies(tmp_path):
    ns = args_for("stage2", "--subjects", "subj01", "subj02", "--logs", str(tmp_path), "--stage1-job", "41")
    plan = plan_for("stage2", ns)
    assert [(p.var, p.indices, p.after) for p in plan] == [("STAGE2_SUBJ01_JOB", [0], [("41", 0), ("41", 1)]),
                                                           ("STAGE2_SUBJ02_JOB", [1], [("41", 2), ("41", 3)])]
    res = Resources(nodes=2, devices=4, cpus=6, partition="gpu", account="lab", time="12:00:00", signal_s=120,
                    mem="200G", max_parallel=3)
    cmd = sbatch_command(plan[1], res, "/venv/bin/python", "/repo")
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6", "--partition=gpu",
                   "--account=lab", "--time=12:00:00", "--mem=200G", "--signal=SIGUSR1@120", "--requeue",
                   "--array=1%3", "--dependency=afterok:41_2:41_3", "--job-name=nsd_stage2", "--chdir=/repo"):
        assert option in cmd, option
    assert cmd[-3:] == ["experiments/slurm/fit_array.sbatch", "/venv/bin/python", str(plan[1].sweep.path())]
    assert "--gpus-per-node=0" not in sbatch_command(plan[0], Resources(gpus=0), "p", "/r")
    # the pipeline refers to its own stage-1 job by shell variable in a dry run
    pipe = plan_for("pipeline", args_for("pipeline", "--subjects", "subj01", "--logs", str(tmp_path)))
    line = sweeps.render(sbatch_command(pipe[1], Resources(), "p", "/r"))
    assert '"--dependency=afterok:${STAGE1_JOB}_0:${STAGE1_JOB}_1"' in line
    assert sweeps.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert isinstance(pipe[0], sweeps.Submission)


def test_make_dry_run_prints_the_exact_sbatch_calls(tmp_path):
    venv = Path(sys.prefix)
    cmd = ["make", "-s", "-C", str(REPO), "-o", str(venv / ".installed"), f"VENV={venv}", "DRY_RUN=1",
           f"LOGS={tmp_path}", "PROFILE=tiny", "SUBJECTS=subj01 subj02", "PARTITION=gpu", "ACCOUNT=lab",
           "WALLTIME=01:00:00", "DEVICES=2", "CPUS=4", "NODES=1", "ARGS=--trainer.max_epochs=3 --seed_everything=1"]
    out = {t.split()[0]: subprocess.run([*cmd, *t.split()], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
           for t in ("slurm-stage1", "slurm-pipeline", "slurm-bottleneck", "slurm-cross-subject NEW_SUBJECTS=subj03")}
    for target, result in out.items():
        assert result.returncode == 0, (target, result.stdout, result.stderr)
    stage1 = out["slurm-stage1"].stdout
    lines = [ln for ln in stage1.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("STAGE1_JOB=$(sbatch --parsable --job-name=tiny_stage1 --array=0-3 ")
    call = shlex.split(lines[0][len("STAGE1_JOB=$("):-1])
    for option in ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=4", "--partition=gpu",
                   "--account=lab", "--time=01:00:00", "--signal=SIGUSR1@90", "--requeue",
                   f"--output={tmp_path}/tiny_stage1/slurm-%A_%a.out"):
        assert option in call, option
    sweep = Path(call[-1])
    assert read_line(sweep, 2)[-6:-4] == ["--trainer.max_epochs=3", "--seed_everything=1"]
    pipeline = out["slurm-pipeline"].stdout
    assert pipeline.count("$(sbatch") == 3 and "afterok:${STAGE1_JOB}_2:${STAGE1_JOB}_3" in pipeline
    assert "--array=0-15" in out["slurm-bottleneck"].stdout  # 2 subjects x 2 targets x 4 widths (default B_SIZES)
    transfer = out["slurm-cross-subject"].stdout
    assert "--array=0-1" in transfer and "afterok" not in transfer  # subj03 x 2 targets, no STAGE1_JOB
    # nothing was submitted: no sbatch is needed for a dry run
    assert not list(tmp_path.rglob("submissions.jsonl"))


def test_stage2_without_a_stage1_job_or_checkpoints_is_an_error_naming_the_fix(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.slurm", "stage2", "--subjects", "subj01",
                             "--logs", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "STAGE1_JOB" in result.stderr and "best.ckpt" in result.stderr


# ------------------------------------------------------------------------------------------- a real Slurm


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node Slurm for the session (munged, slurmctld, slurmd), stopped by PID at the end."""
    try:
        cluster, how = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmSetupError as exc:
        pytest.fail(f"could not set up the local Slurm cluster: {exc}", pytrace=False)
    print(f"local Slurm: {cluster.version()} ({how}) at {cluster.root}")
    yield cluster
    cluster.stop()


def tiny_args(data: Path, logs: Path, *extra: str) -> str:
    """CLI overrides that make the tiny stage-1 config a short CPU fit on the test dataset."""
    return shlex.join([f"--data.init_args.data_dir={data}", "--data.init_args.num_workers=0",
                       "--data.init_args.val_images=8", f"--data.init_args.val_cache_dir={logs / 'val_cache'}",
                       "--data.init_args.samples_per_epoch=96", "--trainer.accelerator=cpu", "--trainer.max_epochs=2",
                       "--trainer.check_val_every_n_epoch=1", *extra])


def cluster_vars(logs: Path, **extra: str) -> dict[str, str]:
    return {"PROFILE": "tiny", "LOGS": str(logs), "DEVICES": "1", "GPUS": "0", "CPUS": "1", "WALLTIME": "00:20:00",
            **extra}


@pytest.fixture(scope="module")
def array_and_transfer(slurm_cluster, small_data, targets, tmp_path_factory):
    """The Makefile's stage-1 array (subj01, subj02; text target) and a cross-subject transfer to subj03 from
    subj01's stage-1 task, submitted together (the transfer waits with afterok)."""
    logs = tmp_path_factory.mktemp("slurm_runs")
    common = cluster_vars(logs, SUBJECTS="subj01 subj02", TARGETS="text", ARGS=tiny_args(small_data, logs))
    t0 = time.monotonic()
    stage1 = make("slurm-stage1", slurm_cluster, **common)["STAGE1_JOB"]
    transfer = make("slurm-cross-subject", slurm_cluster, NEW_SUBJECTS="subj03", SOURCE_SUBJECT="subj01",
                    STAGE1_JOB=stage1, **common)["TRANSFER_JOB"]
    # right after submission the scheduler has not looked at it yet (Reason=None); then it waits on Dependency
    early = jobs.wait_for([transfer], slurm_cluster.env, timeout=30, poll=0.2, until=lambda rs: rs and (
        rs[0]["Reason"] == "Dependency" or jobs.state(rs[0]) != "PENDING"))
    try:
        records = jobs.wait_for([stage1, transfer], slurm_cluster.env, timeout=420)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{diagnostics(slurm_cluster, logs)}", pytrace=False)
    print(f"array + dependent transfer round trip: {time.monotonic() - t0:.1f} s")
    by_id = {r["JobId"]: r for r in records}
    return {"logs": logs, "stage1": stage1, "transfer": transfer, "records": records, "early": early,
            "task": {int(r["ArrayTaskId"]): r for r in records if r["ArrayJobId"] == stage1},
            "transfer_record": next(r for r in by_id.values() if r["ArrayJobId"] == transfer),
            "cluster": slurm_cluster}


@pytest.mark.slow
def test_stage1_array_task_per_subject_writes_checkpoints_config_and_tensorboard(array_and_transfer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = array_and_transfer
    why = diagnostics(run["cluster"], run["logs"])
    assert sorted(run["task"]) == [0, 1], why
    for task, subject in ((0, "subj01"), (1, "subj02")):
        record = run["task"][task]
        assert jobs.state(record) == "COMPLETED" and record["ExitCode"] == "0:0", why
        run_dir = run["logs"] / "tiny_stage1" / f"{task}-{subject}-text"
        config = (run_dir / "config.yaml").read_text()
        assert f"version: {task}-{subject}-text" in config and "strategy: ddp" in config, why
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == 1 and ckpt["provenance"]["subjects"] == [subject]
        assert (run["logs"] / "tiny_stage1" / f"slurm-{run['stage1']}_{task}.out").exists()
        events = EventAccumulator(str(run_dir)).Reload()
        assert len(events.Scalars("val/fwd_top1")) == 2
        assert events.Scalars("train/loss") and events.Scalars(f"val/{subject}/fwd_top1")
        assert not list(run_dir.glob("hpc_ckpt_*"))


@pytest.mark.slow
def test_transfer_starts_only_after_its_stage1_task_and_starts_from_its_checkpoint(array_and_transfer):
    run = array_and_transfer
    why = diagnostics(run["cluster"], run["logs"])
    early = run["early"]
    assert early and jobs.state(early[0]) == "PENDING" and early[0]["Reason"] == "Dependency", (early, why)
    assert early[0]["Dependency"].startswith(f"afterok:{run['stage1']}_0"), early
    source, transfer = run["task"][0], run["transfer_record"]
    assert jobs.state(transfer) == "COMPLETED", why
    assert jobs.timestamp(transfer["StartTime"]) >= jobs.timestamp(source["EndTime"]), (source, transfer)
    # finer than scontrol's seconds: the transfer wrote its config after the source task's last checkpoint
    source_ckpt = run["logs"] / "tiny_stage1" / "0-subj01-text" / "checkpoints" / "last.ckpt"
    transfer_dir = run["logs"] / "tiny_transfer" / "0-subj03-from-subj01-text"
    assert (transfer_dir / "config.yaml").stat().st_mtime > source_ckpt.resolve().stat().st_mtime
    ckpt = torch.load(transfer_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["init_from"] == str(source_ckpt)
    assert ckpt["hyper_parameters"]["new_subjects"] == ["subj03"] and ckpt["provenance"]["subjects"] == ["subj03"]
    assert ckpt["provenance"]["sessions"] == {"subj03": [1]}  # the Makefile's TRANSFER_SESSIONS=1
    counts = json.loads((transfer_dir / "parameters.json").read_text())
    assert counts["trainable_parts"] == ["new_adapters", "routers"]


@pytest.mark.slow
def test_sigusr1_requeues_and_the_task_resumes_from_its_hpc_checkpoint(slurm_cluster, small_data, targets,
                                                                       tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "runs"
    env = slurm_cluster.env
    job = make("slurm-stage1", slurm_cluster, **cluster_vars(
        logs, NAME="requeue", SUBJECTS="subj01", TARGETS="text",
        ARGS=tiny_args(small_data, logs, "--trainer.max_epochs=12")))["STAGE1_JOB"]
    task = f"{job}_0"
    run_dir = logs / "requeue_stage1" / "0-subj01-text"
    t0 = time.monotonic()

    def fail(message: str):
        pytest.fail(f"{message}\n{diagnostics(slurm_cluster, logs)}", pytrace=False)

    # 1. wait until the first run is training past its first checkpoint, then signal the srun'd process
    deadline = time.monotonic() + 240
    while not list((run_dir / "checkpoints").glob("latest-*.ckpt")):
        if time.monotonic() > deadline or jobs.state(jobs.show_jobs(task, env)[0]) in jobs.TERMINAL:
            fail("the first run wrote no checkpoint")
        time.sleep(0.5)
    signalled = subprocess.run(["scancel", "--signal=USR1", task], env=env, capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr
    # 2. Lightning saves hpc_ckpt_1.ckpt and requeues the task; move its start forward instead of waiting 2 min
    try:
        jobs.wait_for([task], env, timeout=120, until=lambda rs: rs and rs[0].get("Restarts") == "1"
                      and jobs.state(rs[0]) == "PENDING")
    except TimeoutError as exc:
        fail(str(exc))
    requeued_at = time.time()
    update = subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], env=env, capture_output=True,
                            text=True)
    assert update.returncode == 0, update.stderr
    try:
        (record,) = jobs.wait_for([task], env, timeout=300)
    except TimeoutError as exc:
        fail(str(exc))
    print(f"requeue round trip: {time.monotonic() - t0:.1f} s")
    why = diagnostics(slurm_cluster, logs)
    assert jobs.state(record) == "COMPLETED" and record["Restarts"] == "1", why
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 0 < hpc["global_step"] < last["global_step"] and last["epoch"] == 11, why
    out = (logs / "requeue_stage1" / f"slurm-{job}_0.out").read_text()
    assert "restart 1" in out and f"Restored all states from the checkpoint at {run_dir / 'hpc_ckpt_1.ckpt'}" in out, why
    # the same TensorBoard run continues: the second run's first logged step is the checkpoint's
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    second = [f for f in files if int(re.search(r"tfevents\.(\d+)", f.name).group(1)) >= requeued_at - 1]
    first = [f for f in files if f not in second]
    assert first and second, files

    def steps(paths):  # a run can write several files (Lightning's signal handler closes the writer)
        accs = [EventAccumulator(str(p)).Reload() for p in paths]
        return sorted({e.step for a in accs if "train/loss" in a.Tags()["scalars"] for e in a.Scalars("train/loss")})

    first_steps, second_steps = steps(first), steps(second)
    print(f"hpc_ckpt_1: global_step {hpc['global_step']} (epoch {hpc['epoch']}); train/loss steps of the first run "
          f"{first_steps}, of the requeued run {second_steps}")
    assert first_steps and first_steps[0] < hpc["global_step"], (first_steps, hpc["global_step"])
    assert second_steps and hpc["global_step"] <= second_steps[0] < hpc["global_step"] + 10, (second_steps,
                                                                                          hpc["global_step"])
    assert second_steps[-1] >= last["global_step"] - 10
