"""Array sweeps: task i of an experiment runs line i of its sweep file; and the sbatch calls that submit them.

    python -m experiments.slurm stage1 --profile tiny --subjects subj01 subj02 --targets text --dry-run

A sweep file holds one line of ``python -m experiments.run`` arguments per array task (shell-quoted; ``#`` lines
are comments, the n-th other line is task n). Every line ends with a run directory derived from the experiment
name and the task id only:

    --trainer.default_root_dir=<logs>/<experiment>/<version>     this task's hpc_ckpt_* (never another task's)
    --trainer.logger.init_args.{save_dir=<logs>, name=<experiment>, version=<version>}     one TensorBoard run

with ``version = "<task id>-<label>"`` (e.g. ``1-subj01-text``). It is stable across requeues: a requeued task
resumes from its own newest ``hpc_ckpt_*`` (``ckpt_path`` stays unset) and keeps writing into the same TensorBoard
run. Sweep files are named by their content (``sweep-<hash>.txt``), so submitting a changed sweep never changes
what a queued or requeued task of an earlier submission runs.

Experiments (``<name>`` defaults to the profile):
    stage1          <name>_stage1       subjects x targets (image, text); one model per subject and target
    bottleneck      <name>_bottleneck   subjects x targets x b_sizes (``model.init_args.b_size``)
    cross-subject   <name>_transfer     new subjects x targets, each from a source subject's stage-1 checkpoint
                                        (``model.init_args.init_from`` + ``new_subjects``, only the new subject's data)
    stage2          <name>_stage2       one job per subject, ``afterok`` on that subject's stage-1 image and text tasks
    pipeline        stage1, then stage2 depending on it
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import itertools
import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.common import atomic_path
from datamodules.shard_format import subject_name

STAGE1_BASE = "configs/base/trainer.yaml"
STAGE2_BASE = "configs/base/stage2_trainer.yaml"
SLURM_CONFIG = "configs/base/slurm.yaml"
SCRIPT = "experiments/slurm/fit_array.sbatch"
TARGETS = {"image": "clip_image", "text": "clip_text"}
BEST = "best.ckpt"  # stage 2 reads the stage-1 epoch that validated best (configs/base/trainer.yaml writes it)


@dataclass(frozen=True)
class Profile:
    """Config files per stage: ``stage1[target]`` after the stage-1 base, ``stage2`` after the stage-2 base."""

    stage1: dict[str, tuple[str, ...]]
    stage2: tuple[str, ...]
    subjects: tuple[str, ...]


PROFILES = {
    "nsd": Profile(stage1={"image": ("configs/stage1/image_nsd.yaml",), "text": ("configs/stage1/text_nsd.yaml",)},
                   stage2=("configs/stage2/sdxl_nsd.yaml",), subjects=("subj01", "subj02", "subj05", "subj07")),
    "tiny": Profile(stage1={"image": ("configs/stage1/tiny_synthetic.yaml", "configs/stage1/tiny_synthetic_image.yaml"),
                            "text": ("configs/stage1/tiny_synthetic.yaml",)},
                    stage2=("configs/stage2/tiny_synthetic.yaml",), subjects=("subj01", "subj02", "subj03")),
}


@dataclass
class Task:
    """One array task: a label for its run directory, its ``experiments.run`` arguments (subcommand first, without
    the run directory) and what it sweeps over (``meta``: subject, target, b_size, source...)."""

    label: str
    args: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _configs(*paths: str) -> list[str]:
    return [a for p in paths for a in ("--config", p)]


@dataclass
class Sweep:
    experiment: str
    logs: str
    tasks: list[Task]

    def version(self, index: int) -> str:
        return f"{index}-{self.tasks[index].label}"

    def run_dir(self, index: int) -> str:
        return f"{self.logs}/{self.experiment}/{self.version(index)}"

    def checkpoint(self, index: int, name: str = "last.ckpt") -> str:
        return f"{self.run_dir(index)}/checkpoints/{name}"

    def line(self, index: int) -> list[str]:
        """The full ``experiments.run`` arguments of task ``index`` (the run directory last, so it always wins)."""
        return [*self.tasks[index].args, f"--trainer.default_root_dir={self.run_dir(index)}",
                f"--trainer.logger.init_args.save_dir={self.logs}",
                f"--trainer.logger.init_args.name={self.experiment}",
                f"--trainer.logger.init_args.version={self.version(index)}"]

    def index(self, **meta: Any) -> int:
        """The task whose meta matches ``meta`` (exactly one)."""
        hits = [i for i, t in enumerate(self.tasks) if all(t.meta.get(k) == v for k, v in meta.items())]
        if len(hits) != 1:
            raise ValueError(f"{self.experiment}: {len(hits)} tasks match {meta} (expected one)")
        return hits[0]

    def text(self) -> str:
        out = [f"# {self.experiment}: {len(self.tasks)} array tasks; task i (SLURM_ARRAY_TASK_ID) runs the i-th "
               "non-comment line as `python -m experiments.run <line>`"]
        for i in range(len(self.tasks)):
            out += [f"# task {i}: {self.version(i)}", shlex.join(self.line(i))]
        return "\n".join(out) + "\n"

    def path(self) -> Path:
        digest = hashlib.sha1(self.text().encode()).hexdigest()[:10]
        return Path(self.logs) / self.experiment / f"sweep-{digest}.txt"

    def write(self) -> Path:
        path = self.path()
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_text(self.text())
        return path


def read_line(path: str | Path, index: int) -> list[str]:
    """The ``experiments.run`` arguments of array task ``index`` of a sweep file."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not 0 <= index < len(lines):
        raise IndexError(f"{path} has {len(lines)} tasks; there is no task {index}")
    return shlex.split(lines[index])


# ----------------------------------------------------------------------------------------------- sweeps
def _profile(profile: str) -> Profile:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: expected one of {sorted(PROFILES)}")
    return PROFILES[profile]


def _targets(targets: Sequence[str]) -> list[str]:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"targets {list(targets)}: expected some of {list(TARGETS)}")
    return list(targets)


def stage1_sweep(profile: str, subjects: Sequence[str], targets: Sequence[str], logs: str, experiment: str,
                 extra: Sequence[str] = (), b_sizes: Sequence[int] | None = None) -> Sweep:
    """Stage 1 over subjects x targets (x bottleneck widths when ``b_sizes`` is given), one subject per model."""
    prof = _profile(profile)
    tasks = []
    for subject, target, b in itertools.product([subject_name(s) for s in subjects], _targets(targets),
                                                b_sizes or [None]):
        args = ["fit", *_configs(STAGE1_BASE, *prof.stage1[target], SLURM_CONFIG),
                f"--data.init_args.subjects=[{subject}]"]
        label = f"{subject}-{target}"
        if b is not None:
            args.append(f"--model.init_args.b_size={int(b)}")
            label += f"-b{int(b)}"
        tasks.append(Task(label, [*args, *extra], {"subject": subject, "target": target, "b_size": b}))
    return Sweep(experiment, logs, tasks)


def stage2_sweep(profile: str, subjects: Sequence[str], stage1: Sweep, logs: str, experiment: str,
                 extra: Sequence[str] = ()) -> Sweep:
    """Stage 2 per subject on that subject's stage-1 image and text checkpoints (from ``stage1``'s run dirs)."""
    prof = _profile(profile)
    tasks = []
    for subject in [subject_name(s) for s in subjects]:
        image, text = (stage1.index(subject=subject, target=t, b_size=None) for t in ("image", "text"))
        args = ["fit", *_configs(STAGE2_BASE, *prof.stage2, SLURM_CONFIG), f"--data.init_args.subjects=[{subject}]",
                f"--model.init_args.image_encoder={stage1.checkpoint(image, BEST)}",
                f"--model.init_args.text_encoder={stage1.checkpoint(text, BEST)}"]
        tasks.append(Task(subject, [*args, *extra], {"subject": subject, "stage1": (image, text)}))
    return Sweep(experiment, logs, tasks)


def transfer_sweep(profile: str, new_subjects: Sequence[str], targets: Sequence[str], source: str, logs: str,
                   experiment: str, stage1: Sweep | None = None, init_from: str | None = None,
                   extra: Sequence[str] = (), sessions: int | None = None) -> Sweep:
    """Cross-subject transfer: each new subject trained from the source subject's stage-1 checkpoint (per target;
    ``init_from`` instead names one checkpoint for a single target) on its first ``sessions`` sessions (None: all).
    Only the new subject's adapter is fresh; what trains is the model's ``trainable`` (default: adapter and
    routers; override with ARGS='--model.init_args.trainable=[...]')."""
    prof = _profile(profile)
    targets = _targets(targets)
    source = subject_name(source)
    if init_from and len(targets) != 1:
        raise ValueError(f"init_from names one checkpoint (one target), but targets are {targets}")
    if not init_from and stage1 is None:
        raise ValueError("a transfer needs init_from or the stage-1 sweep that trained the source subject")
    tasks = []
    for subject, target in itertools.product([subject_name(s) for s in new_subjects], targets):
        if subject == source:
            raise ValueError(f"new subject {subject} is the source subject")
        src = None if init_from else stage1.index(subject=source, target=target, b_size=None)
        ckpt = init_from or stage1.checkpoint(src)
        args = ["fit", *_configs(STAGE1_BASE, *prof.stage1[target], SLURM_CONFIG),
                f"--data.init_args.subjects=[{subject}]", f"--model.init_args.init_from={ckpt}",
                f"--model.init_args.new_subjects=[{subject}]"]
        if sessions:
            args.append(f"--data.init_args.num_sessions={int(sessions)}")
        tasks.append(Task(f"{subject}-from-{source}-{target}", [*args, *extra],
                          {"subject": subject, "target": target, "source": source, "stage1": src,
                           "sessions": sessions}))
    return Sweep(experiment, logs, tasks)


# ----------------------------------------------------------------------------------------------- sbatch
@dataclass(frozen=True)
class Resources:
    """What every task of a submission asks for (the Makefile's NODES, DEVICES, GPUS, CPUS, ...)."""

    nodes: int = 1
    devices: int = 1                  # srun tasks per node = Lightning devices (configs/base/slurm.yaml reads it)
    gpus: int | None = None           # GPUs per node: None = devices, 0 = none (CPU nodes)
    cpus: int = 8                     # CPUs per task (loader workers + main process)
    mem: str | None = None            # per node, e.g. 64G; None: the partition's default
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    signal_s: int = 90                # SIGUSR1 this long before the time limit: Lightning saves and requeues
    max_parallel: int | None = None   # at most this many array tasks at once (--array=...%N)
    sbatch_args: tuple[str, ...] = ()

    def options(self) -> list[str]:
        gpus = self.devices if self.gpus is None else self.gpus
        out = [f"--nodes={self.nodes}", f"--ntasks-per-node={self.devices}", f"--cpus-per-task={self.cpus}"]
        out += [f"--gpus-per-node={gpus}"] if gpus else []
        out += [f"--partition={self.partition}"] if self.partition else []
        out += [f"--account={self.account}"] if self.account else []
        out += [f"--mem={self.mem}"] if self.mem else []
        out += [f"--time={self.time}", f"--signal=SIGUSR1@{self.signal_s}", "--requeue", "--open-mode=append"]
        return out + list(self.sbatch_args)


@dataclass
class Submission:
    """One ``sbatch`` of some tasks of a sweep. ``after``: ``afterok`` on (job, task) pairs, where job is a job id
    or the ``var`` of an earlier submission of the same plan (its id once submitted; ``${VAR}`` in a dry run)."""

    var: str
    sweep: Sweep
    indices: list[int]
    after: list[tuple[str, int]] = field(default_factory=list)


def array_spec(indices: Iterable[int], max_parallel: int | None = None) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (plus ``%N``)."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    spec = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return spec + (f"%{max_parallel}" if max_parallel else "")


def sbatch_command(sub: Submission, resources: Resources, python: str, chdir: str,
                   job_ids: dict[str, str] | None = None) -> list[str]:
    """The sbatch call of one submission (``job_ids`` resolves dependencies on earlier submissions; missing ones
    are written ``${VAR}``, for a dry run's shell script)."""
    job_ids = job_ids or {}
    sweep = sub.sweep
    cmd = ["sbatch", "--parsable", f"--job-name={sweep.experiment}",
           f"--array={array_spec(sub.indices, resources.max_parallel)}", *resources.options(),
           f"--output={sweep.logs}/{sweep.experiment}/slurm-%A_%a.out", f"--chdir={chdir}"]
    if sub.after:
        deps = [f"{job_ids.get(job, '${' + job + '}' if job.isidentifier() else job)}_{task}"
                for job, task in sub.after]
        cmd += [f"--dependency=afterok:{':'.join(deps)}", "--kill-on-invalid-dep=yes"]
    return [*cmd, SCRIPT, python, str(sweep.path())]


def render(cmd: Sequence[str]) -> str:
    """A shell line; a dependency on ``${VAR}`` stays expandable (double quotes)."""
    return " ".join(f'"{a}"' if a.startswith("--dependency=") and "${" in a else shlex.quote(a) for a in cmd)


def run_plan(plan: Sequence[Submission], resources: Resources, python: str, chdir: str, dry_run: bool = False,
             env: dict[str, str] | None = None, out: Callable[[str], None] = print) -> dict[str, str]:
    """Write the sweep files and submit (or, in a dry run, print as a shell script) every submission in order;
    returns ``{var: job id}`` (empty in a dry run)."""
    job_ids: dict[str, str] = {}
    for sub in plan:
        path = sub.sweep.write()
        out(f"# {sub.sweep.experiment}: tasks {array_spec(sub.indices)} of {len(sub.sweep.tasks)} in {path}")
        for i in sub.indices:
            out(f"#   {sub.sweep.version(i)}")
        cmd = sbatch_command(sub, resources, python, chdir, job_ids)
        if dry_run:
            out(f"{sub.var}=$({render(cmd)})")
            continue
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}\n  {render(cmd)}")
        job_ids[sub.var] = result.stdout.strip().split(";")[0]
        record = {"job_id": job_ids[sub.var], "array": array_spec(sub.indices), "sweep": str(path),
                  "versions": [sub.sweep.version(i) for i in sub.indices], "command": cmd,
                  "submitted": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        with open(Path(sub.sweep.logs) / sub.sweep.experiment / "submissions.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        out(f"# {render(cmd)}")
        out(f"{sub.var}={job_ids[sub.var]}")
    return job_ids


# ----------------------------------------------------------------------------------------------- plans
def plan_for(command: str, args: argparse.Namespace) -> list[Submission]:
    """The submissions of one ``python -m experiments.slurm`` command."""
    subjects = args.subjects or list(_profile(args.profile).subjects)
    name, logs = args.name or args.profile, args.logs
    stage1_extra = [*args.args, *args.stage1_args]

    def stage1() -> Sweep:
        return stage1_sweep(args.profile, subjects, args.targets, logs, f"{name}_stage1", stage1_extra)

    def upstream(indices: Iterable[int], own: str | None = None) -> list[tuple[str, int]]:
        job = own or args.stage1_job
        return [(job, i) for i in sorted(set(indices))] if job else []

    if command == "stage1":
        sweep = stage1()
        return [Submission("STAGE1_JOB", sweep, list(range(len(sweep.tasks))))]
    if command == "bottleneck":
        if not args.b_sizes:
            raise ValueError("the bottleneck sweep needs b_sizes (B_SIZES='256 512 ...')")
        sweep = stage1_sweep(args.profile, subjects, args.targets, logs, f"{name}_bottleneck", stage1_extra,
                             b_sizes=args.b_sizes)
        return [Submission("BOTTLENECK_JOB", sweep, list(range(len(sweep.tasks))))]
    if command == "cross-subject":
        if not args.new_subjects:
            raise ValueError("the cross-subject sweep needs new subjects (NEW_SUBJECTS='subj05 ...')")
        source = stage1() if not args.init_from else None
        sweep = transfer_sweep(args.profile, args.new_subjects, args.targets, args.source_subject, logs,
                               f"{name}_transfer", stage1=source, init_from=args.init_from, extra=stage1_extra,
                               sessions=args.transfer_sessions)
        after = upstream(t.meta["stage1"] for t in sweep.tasks) if source is not None else []
        if not after and source is not None and not args.dry_run:
            _require_files([source.checkpoint(t.meta["stage1"]) for t in sweep.tasks], "STAGE1_JOB")
        return [Submission("TRANSFER_JOB", sweep, list(range(len(sweep.tasks))), after)]
    if command in ("stage2", "pipeline"):
        if not {"image", "text"} <= set(args.targets):
            raise ValueError(f"stage 2 needs stage-1 image and text encoders; targets are {args.targets}")
        s1 = stage1()
        s2 = stage2_sweep(args.profile, subjects, s1, logs, f"{name}_stage2", [*args.args, *args.stage2_args])
        plan = [Submission("STAGE1_JOB", s1, list(range(len(s1.tasks))))] if command == "pipeline" else []
        own = "STAGE1_JOB" if command == "pipeline" else None
        if not own and not args.stage1_job and not args.dry_run:
            _require_files([s1.checkpoint(i, BEST) for t in s2.tasks for i in t.meta["stage1"]], "STAGE1_JOB")
        for i, task in enumerate(s2.tasks):  # one job per subject: it waits for its own stage-1 tasks only
            plan.append(Submission(f"STAGE2_{task.meta['subject'].upper()}_JOB", s2, [i], upstream(task.meta["stage1"], own)))
        return plan
    raise ValueError(f"unknown command {command!r}")


def _require_files(paths: Iterable[str], option: str) -> None:
    missing = [p for p in dict.fromkeys(paths) if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no stage-1 checkpoint at {', '.join(missing)}: train stage 1 first, or pass "
                                f"{option}=<job id of the stage-1 array> to wait for it")


def _none_if_empty(value: str) -> str | None:
    return value or None


def _int_or_none(value: str) -> int | None:
    return int(value) if value else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("stage1", "stage2", "pipeline", "bottleneck", "cross-subject"))
    p.add_argument("--profile", default="nsd", choices=sorted(PROFILES),
                   help="nsd: the paper-scale configs; tiny: the synthetic data and tiny models")
    p.add_argument("--subjects", nargs="*", default=[], help="default: the profile's subjects")
    p.add_argument("--targets", nargs="*", default=["image", "text"], choices=list(TARGETS))
    p.add_argument("--b-sizes", nargs="*", type=int, default=[], help="bottleneck widths (bottleneck)")
    p.add_argument("--new-subjects", nargs="*", default=[], help="subjects to transfer to (cross-subject)")
    p.add_argument("--source-subject", default="subj01", help="the stage-1 subject they start from")
    p.add_argument("--transfer-sessions", type=lambda v: int(v) if v else None, default=None,
                   help="the new subjects' first N sessions (cross-subject; empty: all)")
    p.add_argument("--init-from", type=_none_if_empty, default=None,
                   help="a stage-1 checkpoint to transfer from (one target) instead of the stage-1 sweep's")
    p.add_argument("--stage1-job", type=_none_if_empty, default=None,
                   help="job id of the submitted stage-1 array: stage2 / cross-subject tasks wait for (afterok) "
                        "the stage-1 tasks they read")
    p.add_argument("--logs", default="runs", help="TensorBoard save_dir; run dirs are <logs>/<experiment>/<version>")
    p.add_argument("--name", type=_none_if_empty, default=None, help="experiment name prefix (default: profile)")
    p.add_argument("--args", type=shlex.split, default=[], help="CLI overrides appended to every task")
    p.add_argument("--stage1-args", type=shlex.split, default=[], help="... to stage-1 tasks only")
    p.add_argument("--stage2-args", type=shlex.split, default=[], help="... to stage-2 tasks only")
    r = p.add_argument_group("resources (per array task)")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--devices", type=int, default=1, help="srun tasks (= GPUs, Lightning devices) per node")
    r.add_argument("--gpus", type=_int_or_none, default=None, help="GPUs per node (default: devices; 0: none)")
    r.add_argument("--cpus", type=int, default=8, help="CPUs per srun task")
    r.add_argument("--mem", type=_none_if_empty, default=None)
    r.add_argument("--partition", type=_none_if_empty, default=None)
    r.add_argument("--account", type=_none_if_empty, default=None)
    r.add_argument("--time", default="24:00:00")
    r.add_argument("--signal-s", type=int, default=90, help="SIGUSR1 this many seconds before the time limit")
    r.add_argument("--max-parallel", type=_int_or_none, default=None)
    r.add_argument("--sbatch-args", type=shlex.split, default=[], help="more sbatch options")
    p.add_argument("--python", default=sys.executable, help="the interpreter the tasks run")
    p.add_argument("--chdir", default=str(Path.cwd()), help="the tasks' working directory (the repository)")
    p.add_argument("--dry-run", action="store_true", help="write the sweep files, print the sbatch calls")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    resources = Resources(nodes=args.nodes, devices=args.devices, gpus=args.gpus, cpus=args.cpus, mem=args.mem,
                          partition=args.partition, account=args.account, time=args.time, signal_s=args.signal_s,
                          max_parallel=args.max_parallel, sbatch_args=tuple(args.sbatch_args))
    try:
        plan = plan_for(args.command, args)
        run_plan(plan, resources, args.python, args.chdir, dry_run=args.dry_run)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
