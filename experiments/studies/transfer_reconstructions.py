"""The transfer study through stage 2: the new subject's test reconstructions from every run's encoder.

One stage 2 (the study's ``stage2`` stack: the target's branch alone, e.g. ``ablations/image_only_ts.yaml``) is
fitted on the source subjects with the source run's encoder and then kept fixed, as a new subject is meant to
reuse it (stage 2 has no per-subject part). Each new-subject run's encoder replaces the source encoder at
``predict`` (``brain`` of that run), beside a ridge regression trained on the same sessions of the new subject
(``ridge``: its predicted embeddings as condition tables, the MindEye2-style linear baseline at the same data
budget), the ceiling (the true target embeddings) and the transfer run fed shuffled brains; every row is scored
by the evaluation suite with the world's CLIP. Finished steps are reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.studies.ablations import fit_row, predict_once
from experiments.studies.reconstruction_rows import evaluate_rows, tables_override
from experiments.studies.runs import cli_args, ridge_predictions, run_dir

METRICS = ("pixcorr", "ssim", "clip", "clip_top1", "clip_cosine")
ENCODER = {"clip_image": ("image", "image_encoder"), "clip_text": ("text", "text_encoder")}


def _checkpoint(result: dict[str, Any]) -> str:
    return str(Path(result["dir"]) / "checkpoints" / "last.ckpt")


def reconstruct_runs(study, results: dict[str, dict]) -> dict[str, Any]:
    """Fit the fixed stage 2 on the source run, predict the new subject per run -> {"rows": {run: mean metric
    values}, "subjects": per-row per-subject values, "stage2": its run directory}."""
    if study.target not in ENCODER:
        raise ValueError(f"--target: reconstructions need clip_image or clip_text, got {study.target}")
    branch, option = ENCODER[study.target]
    out, world = Path(study.out_dir), Path(study.world)
    common = [f"--data.init_args.data_dir={study.data_dir}",
              f"--model.init_args.sdxl_dir={world}",
              f"--model.init_args.ip_adapter_weights={world / 'ip_adapter.safetensors'}",
              *([f"--trainer.max_epochs={study.stage2_epochs}"] if study.stage2_epochs else []), *study.stage2_extra]
    fit_args = [*cli_args(study.stage2, out, "stage2"), *common,
                f"--data.init_args.subjects=[{', '.join(study.source_subjects)}]",
                f"--model.init_args.{option}={_checkpoint(results['source'])}"]
    checkpoint = fit_row(fit_args, run_dir(out, "stage2"))
    new = study.new_subject
    predict_args = [a for a in fit_args if not a.startswith(("--trainer.logger.init_args.version=",
                                                             "--data.init_args.subjects="))]
    predict_args.append(f"--data.init_args.subjects=[{new}]")
    rows: dict[str, list[str]] = {run: [f"--model.init_args.{option}={_checkpoint(r)}"]
                                  for run, r in results.items() if run != "source"}
    from experiments.studies.transfer import data_args

    ridge = ridge_predictions(out / "ridge" / study.target, study.target, data_args(study, [new], study.sessions),
                              configs=study.configs)
    rows["ridge"] = [*rows.get("transfer", []), tables_override({branch: ridge["dir"]})]
    target_dir = Path(study.data_dir) / "targets" / study.target
    rows["ceiling"] = [*rows.get("transfer", []), tables_override({branch: str(target_dir)})]
    if "transfer" in rows:
        rows["shuffled"] = [*rows["transfer"], "--model.init_args.shuffle_conditions=true"]
    recon = {}
    for row, overrides in rows.items():
        recon[row] = predict_once(predict_args, checkpoint, out, "stage2", row, [*overrides], [new])
    scored = evaluate_rows(Path(study.data_dir), recon, [new], str(world / "image_encoder"), study.bootstrap,
                           metrics=METRICS)
    return {"rows": {row: per[-1].values for row, per in scored.items()},
            "intervals": {row: {k: list(v) for k, v in per[-1].intervals.items()} for row, per in scored.items()},
            "num_images": next(iter(scored.values()))[-1].num_images, "stage2": str(run_dir(out, "stage2")),
            "metrics": list(METRICS)}
