"""The stage-2 ablation study end to end on the reduced learned world (32 px, the small dataset, subject 1).

A subset of the nine rows (the full model, one branch alone each way), short fits from one seed, then the study's
files. Assertions are what the planted ground truth guarantees, not today's numbers: every conditioned row is
identified (CLIP two-way) better than the full model fed shuffled brains; the rows were fitted from the same seed
with their own ablation config; the directions are read from paired intervals and set beside the paper's table.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from experiments.studies import ablations as A
from tests.helpers.world_stage1 import cache_world_targets, fit_world_stage1

pytestmark = pytest.mark.slow
ROWS = ("text_image_ts", "text_only", "image_only")


@pytest.fixture(scope="module")
def study(reduced_world, small_data, tmp_path_factory) -> A.AblationStudy:
    root = tmp_path_factory.mktemp("ablation")
    targets = cache_world_targets(reduced_world, small_data, root / "targets")
    encoders = fit_world_stage1(reduced_world, small_data, targets, root / "stage1", epochs=12)
    return A.AblationStudy(small_data, root / "study", encoders["clip_image"], encoders["clip_text"], reduced_world,
                           rows=ROWS, epochs=2, bootstrap=200, subjects=["subj01"],
                           extra=["--data.init_args.val_images=8", f"--data.init_args.val_cache_dir={root / 'val'}",
                                  "--data.init_args.samples_per_epoch=160", "--data.init_args.eval_batch_size=10"],
                           stage1_epochs=12, stage1_extra=["--data.init_args.val_images=8",
                                                           "--trainer.check_val_every_n_epoch=100",
                                                           f"--data.init_args.val_cache_dir={root / 'val1'}"],
                           targets=targets)  # not small_data/targets: another test may cache the tiny CLIP's there


@pytest.fixture(scope="module")
def record(study) -> dict:
    return A.run_ablation_study(study, log=lambda *_: None)


def test_the_study_fits_every_row_from_one_seed_with_its_ablation_config_and_writes_its_files(study, record):
    out = Path(study.out_dir)
    for row in ROWS:
        config = yaml.safe_load((out / "runs" / row / "run" / "config.yaml").read_text())
        assert config["seed_everything"] == study.seed
        branches = config["model"]["init_args"]
        assert (branches["image_branch"] is None) == (row == "text_only"), row
        assert (branches["text_branch"] is None) == (row == "image_only"), row
    assert set(record["rows"]) == {*ROWS, A.UNIT_ROUTER, A.DENSE_ROUTER, A.RIDGE, A.SHUFFLED}
    assert {"git_commit", "package_versions", "command"} <= set(record["provenance"])
    lines = list(csv.DictReader((out / "ablations.csv").open()))
    # rows + the unit-router, dense and ridge rows + control, subject + mean, metrics
    assert len(lines) == (len(ROWS) + 4) * 2 * len(A.ROW_METRICS)
    compared = [r for r in lines if r["subject"] == "mean" and r["paper_metric"]]
    assert {(r["row"], r["metric"]) for r in compared} == {(row, o) for row in ROWS[1:] for o, _ in A.COMPARED}
    assert all(float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"]) for r in lines)
    report = (out / "report.md").read_text()
    assert "0.415 -> 0.410" in report and "Text only" in report  # the paper's SSIM, full -> Text only
    for name in ("ablations.png", "ablations_grid.png", "ablations.json"):
        assert (out / name).stat().st_size > 0
    assert "Routers and baselines side by side" in report and A.DENSE_LABEL in report and A.RIDGE_LABEL in report


def _stage2_model(out: Path, row: str) -> dict:
    return yaml.safe_load((out / "runs" / row / "run" / "config.yaml").read_text())["model"]["init_args"]


def _assert_full_model_but_its_encoders(out: Path, row: str) -> dict:
    """The row's stage-2 config is the full model's but for its stage-1 encoders -> the row's model config."""
    mine, full = _stage2_model(out, row), _stage2_model(out, A.FULL)
    assert {k: v for k, v in mine.items() if not k.endswith("_encoder")} == \
        {k: v for k, v in full.items() if not k.endswith("_encoder")}
    return mine


def test_the_unit_router_row_is_the_full_model_on_encoders_that_keep_unit_identity(study, record):
    out = Path(study.out_dir)
    unit = _assert_full_model_but_its_encoders(out, A.UNIT_ROUTER)
    for target, option in (("clip_image", "image_encoder"), ("clip_text", "text_encoder")):
        assert unit[option] == str(out / "stage1" / f"{target}_unit" / "run" / "checkpoints" / "last.ckpt")
        stage1 = yaml.safe_load((out / "stage1" / f"{target}_unit" / "run" / "config.yaml").read_text())
        assert stage1["model"]["init_args"]["moe"]["init_args"]["scoring"] == "unit"
        assert stage1["model"]["init_args"]["target"] == target
    clip = {row: r["mean"]["values"]["clip"] for row, r in record["rows"].items()}
    assert clip[A.UNIT_ROUTER] > clip[A.SHUFFLED], clip  # its conditioning carries the brain too


def test_the_baselines_are_the_full_model_on_dense_encoders_and_on_ridge_embeddings(study, record):
    out = Path(study.out_dir)
    _assert_full_model_but_its_encoders(out, A.DENSE_ROUTER)
    for target in ("clip_image", "clip_text"):
        stage1 = yaml.safe_load((out / "stage1" / f"{target}_value_cap2" / "run" / "config.yaml").read_text())
        moe = stage1["model"]["init_args"]["moe"]["init_args"]
        assert moe["capacity_factor"] == 2.0 and moe["scoring"] == "value"
        assert (out / "ridge" / target / "subj01" / "meta.json").is_file()  # ridge test predictions, per subject
    assert record["reconstructions"][A.RIDGE].endswith("run_ridge/reconstructions")
    clip = {row: r["mean"]["values"]["clip"] for row, r in record["rows"].items()}
    for row in (A.DENSE_ROUTER, A.RIDGE):  # both carry the brain
        assert clip[row] > clip[A.SHUFFLED], clip


def test_every_conditioned_row_is_identified_better_than_the_shuffled_brains(record):
    clip = {row: r["mean"]["values"]["clip"] for row, r in record["rows"].items()}
    for row in ROWS:
        assert clip[row] > clip[A.SHUFFLED], clip
        assert record["comparison"][row]["over_shuffled_clip"]["diff"] == pytest.approx(clip[row] - clip[A.SHUFFLED])


def test_finished_fits_and_predictions_are_read_back_not_redone(study, record):
    for row in ROWS:
        directory = Path(study.out_dir) / "runs" / row / "run"
        last = directory / "checkpoints" / "last.ckpt"
        before = last.resolve().stat().st_mtime_ns
        assert A.fit_row(A.row_args(study, row), directory) == last
        assert last.resolve().stat().st_mtime_ns == before
        assert A.predicted(Path(record["reconstructions"][row]), study.subjects)


def test_directions_come_from_paired_intervals_and_are_set_beside_the_papers():
    assert A.paper_direction("text_only", "ssim") == "worse"  # 0.410 < 0.415
    assert A.paper_direction("image_only", "ssim") == "better"  # 0.422 > 0.415
    assert A.paper_direction("text_image_t_hard", "dreamsim") == "worse"  # a distance: higher is worse
    assert A.our_direction({"diff": 0.02, "interval": [0.01, 0.03]}) == "better"
    assert A.our_direction({"diff": 0.02, "interval": [-0.01, 0.05]}) == "tie"
    assert A.our_direction({"diff": -0.02, "interval": [-0.03, -0.01]}) == "worse"
    assert A.agreement("worse", "worse") == "agrees"
    assert A.agreement("worse", "better") == "differs"
    assert A.agreement("worse", "tie") == "unresolved"
    assert set(A.PAPER_ABLATION) == set(A.ROWS) == {p.stem for p in A.ABLATIONS.glob("*.yaml")}


def test_the_command_names_a_missing_stage1_checkpoint_in_one_line(small_data, reduced_world, tmp_path, capsys):
    from datamodules.common import run_command
    from experiments.ablation_study import main

    status = run_command(main, ["--data", str(small_data), "--world", str(reduced_world), "--out", str(tmp_path),
                                "--image-encoder", str(tmp_path / "missing.ckpt")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "--image-encoder" in err, err
