"""Cross-subject transfer study: does a new subject need only its adapter and the routers?

Five runs on one dataset, each fitted and tested through the CLI (test retrieval top-1 of the new subject):
  source            all parts trained on the source subjects, all their sessions
  full              the new subject from scratch with all its sessions (the reference the transfer is judged by)
  transfer          the source model + a fresh adapter for the new subject; trains ``new_adapters`` and ``routers``
                    on ``sessions`` sessions, experts / heads / prior frozen
  same_from_scratch the same trainable parts on the same sessions, everything else at random initialisation
  all_from_scratch  every part from scratch on the same sessions (MindEye2's fine-tuning without pretraining)
  fine_tuned        the source model + a fresh adapter, every part trained on the same sessions (the source
                    model fine-tuned entirely)
With ``stage2`` the runs' encoders also go through one stage 2 on the learned world, fitted on the source
subjects (``studies.transfer_reconstructions``): the new subject's test reconstructions are scored per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.common import provenance, write_json_atomic
from experiments.studies.runs import TINY_STUDY, fit_and_test

RUNS = ("source", "full", "transfer", "same_from_scratch", "all_from_scratch", "fine_tuned")
FROM_SOURCE = ("transfer", "fine_tuned")
FINE_TUNED_PARTS = "[new_adapters, routers, experts, heads, prior, token_head]"


@dataclass
class TransferStudy:
    """data_dir: prepared data; out_dir: runs and ``transfer_study.json``; new_subject / source_subjects;
    sessions: the new subject's sessions for transfer and the one-session baselines; configs: the run stack;
    target: the stage-1 target; *_epochs: epochs per run; transfer_lr: learning rate of the runs that train only
    an adapter and the routers (a fresh linear adapter fits faster than the default allows); runs: which to do;
    extra: CLI overrides of every stage-1 run; stage2: a stage-2 config stack to reconstruct through (None: the
    study stops at stage-1 retrieval); world / stage2_epochs / stage2_extra / bootstrap: its world, epochs, CLI
    overrides and the evaluation's bootstrap."""

    data_dir: Path
    out_dir: Path
    new_subject: str = "subj03"
    source_subjects: list[str] = field(default_factory=lambda: ["subj01", "subj02"])
    sessions: int = 1
    configs: list[Path] = field(default_factory=lambda: list(TINY_STUDY))
    target: str = "clip_text"
    source_epochs: int = 20
    full_epochs: int = 20
    transfer_epochs: int = 40
    transfer_lr: float = 1e-2
    runs: tuple[str, ...] = RUNS
    extra: list[str] = field(default_factory=list)
    stage2: list[Path] | None = None
    world: Path | None = None
    stage2_epochs: int | None = None
    stage2_extra: list[str] = field(default_factory=list)
    bootstrap: int = 200


def data_args(study: TransferStudy, subjects: list[str], sessions: int | None) -> list[str]:
    out = Path(study.out_dir)
    args = [f"--data.init_args.data_dir={study.data_dir}", f"--data.init_args.subjects=[{', '.join(subjects)}]",
            f"--data.init_args.targets={{{study.target}: targets/{study.target}}}",
            f"--model.init_args.target={study.target}", f"--data.init_args.val_cache_dir={out / 'val_cache'}"]
    return args + ([f"--data.init_args.num_sessions={sessions}"] if sessions else []) + list(study.extra)


def run_transfer_study(study: TransferStudy) -> dict[str, Any]:
    """Run (or read back) the study's runs; writes ``transfer_study.json`` / ``.csv`` / ``.png`` and ``report.md``
    and returns ``{"rows", "ratio_to_full", "gain_over_same",
    "study", "provenance"}`` (rows: run, subjects, sessions, trainable parts and counts, test top-1)."""
    unknown = sorted(set(study.runs) - set(RUNS))
    if unknown:
        raise ValueError(f"unknown runs {unknown}; choose from {list(RUNS)}")
    out, new = Path(study.out_dir), study.new_subject
    one = study.sessions
    plans: dict[str, tuple[list[str], int | None, list[str]]] = {
        "source": (study.source_subjects, None, [f"--trainer.max_epochs={study.source_epochs}"]),
        "full": ([new], None, [f"--trainer.max_epochs={study.full_epochs}"]),
        "transfer": ([new], one, [f"--trainer.max_epochs={study.transfer_epochs}",
                                  f"--model.init_args.lr={study.transfer_lr}",
                                  f"--model.init_args.new_subjects=[{new}]",
                                  "--model.init_args.trainable=[new_adapters, routers]"]),
        "same_from_scratch": ([new], one, [f"--trainer.max_epochs={study.transfer_epochs}",
                                           f"--model.init_args.lr={study.transfer_lr}",
                                           "--model.init_args.trainable=[adapters, routers]"]),
        "all_from_scratch": ([new], one, [f"--trainer.max_epochs={study.transfer_epochs}"]),
        "fine_tuned": ([new], one, [f"--trainer.max_epochs={study.transfer_epochs}",
                                    f"--model.init_args.new_subjects=[{new}]",
                                    f"--model.init_args.trainable={FINE_TUNED_PARTS}"]),
    }
    if any(r in study.runs for r in FROM_SOURCE) and "source" not in study.runs:
        raise ValueError(f"the runs {list(FROM_SOURCE)} need the source run")
    if study.stage2 and "source" not in study.runs:
        raise ValueError("reconstructions (stage2) need the source run: stage 2 is fitted on its encoder")
    results: dict[str, dict] = {}
    for name in [r for r in RUNS if r in study.runs]:
        subjects, sessions, extra = plans[name]
        if name in FROM_SOURCE:
            extra = [*extra, f"--model.init_args.init_from={Path(results['source']['dir']) / 'checkpoints/last.ckpt'}"]
        results[name] = fit_and_test(study.configs, [*data_args(study, subjects, sessions), *extra], out, name)
        results[name].update(subjects=subjects, sessions=sessions or "all")
    rows = []
    for name, r in results.items():
        m, p = r["metrics"], r["parameters"] or {}
        subject = new if name != "source" else None
        rows.append({"run": name, "subjects": r["subjects"], "sessions": r["sessions"],
                     "trainable_parts": p.get("trainable_parts"), "trainable": p.get("trainable"),
                     "total": p.get("total"), "groups": p.get("groups"),
                     "fwd_top1": m.get(f"test/{subject}/fwd_top1", m.get("test/fwd_top1")),
                     "bwd_top1": m.get(f"test/{subject}/bwd_top1"),
                     "candidates": m.get(f"test/{subject}/candidates") if subject else None})
    by = {r["run"]: r for r in rows}
    record: dict[str, Any] = {"rows": rows, "study": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(study).items()}}
    if "transfer" in by and "full" in by:
        record["ratio_to_full"] = by["transfer"]["fwd_top1"] / max(1e-12, by["full"]["fwd_top1"])
    if "transfer" in by and "same_from_scratch" in by:
        record["gain_over_same"] = by["transfer"]["fwd_top1"] - by["same_from_scratch"]["fwd_top1"]
    record["study"]["configs"] = [str(c) for c in study.configs]
    if study.stage2:
        from experiments.studies.transfer_reconstructions import reconstruct_runs

        record["study"]["stage2"] = [str(c) for c in study.stage2]
        record["reconstructions"] = reconstruct_runs(study, results)
        for row in rows:
            row["reconstruction"] = record["reconstructions"]["rows"].get(row["run"])
    record["provenance"] = provenance(data_dir=str(study.data_dir), subjects=[*study.source_subjects, new])
    write_json_atomic(out / "transfer_study.json", record)
    from experiments.studies.transfer_report import write_outputs

    write_outputs(record, out)
    return record


def format_study(record: dict[str, Any]) -> str:
    """The study as a text table."""
    lines = [f"{'run':18} {'subjects':16} {'sessions':>8} {'trained params':>15} {'share':>7} {'top-1 fwd':>9} "
             f"{'bwd':>6}  trained parts"]
    for r in record["rows"]:
        share = r["trainable"] / r["total"] if r["trainable"] and r["total"] else float("nan")
        lines.append(f"{r['run']:18} {','.join(r['subjects']):16} {str(r['sessions']):>8} "
                     f"{r['trainable'] or 0:>15,d} {share:7.2%} {r['fwd_top1']:9.3f} "
                     f"{r['bwd_top1'] if r['bwd_top1'] is not None else float('nan'):6.3f}  "
                     f"{', '.join(r['trainable_parts'] or [])}")
    if "ratio_to_full" in record:
        lines.append(f"transfer / full = {record['ratio_to_full']:.2f}")
    if "gain_over_same" in record:
        lines.append(f"transfer - same parameters from scratch = {record['gain_over_same']:+.3f}")
    if "reconstructions" in record:
        rec = record["reconstructions"]
        lines += ["", f"the new subject's test reconstructions through one stage 2 fitted on the source subjects "
                  f"({rec['num_images']} images; chance: 2-way 50%, top-1 {100 / rec['num_images']:.1f}%)",
                  f"{'row':18} {'CLIP 2-way':>10} {'CLIP top-1':>10} {'CLIP cos':>8} {'SSIM':>6} {'PixCorr':>7}"]
        for row, v in rec["rows"].items():
            lines.append(f"{row:18} {v['clip']:9.1f}% {v['clip_top1']:9.1f}% {v['clip_cosine']:8.3f} "
                         f"{v['ssim']:6.3f} {v['pixcorr']:7.3f}")
    return "\n".join(lines)
