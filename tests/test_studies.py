"""The studies on synthetic data, through the real CLI, at the paper's capacity_factor 1 (configs/stage1/tiny_study.yaml,
the router that keeps unit identity): one-session transfer against the full-data model and against the same
parameters trained from scratch; retrieval against the bottleneck width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.synthetic import SyntheticNSDConfig, generate, simulate
from experiments import bottleneck_report, transfer_study
from experiments.studies.runs import TINY_STUDY, fit_and_test

# the study dataset of the README (experiments/transfer_study.py): 3 subjects, 4 sessions of 120 trials, 40 test
# images, reliable voxels, so that differences between runs exceed the 1 / 40 resolution of retrieval
STUDY = SyntheticNSDConfig(seed=5, voxels=(240, 240, 240), num_sessions=4, trials_per_session=120,
                           num_test_images=40, image_size=32, reliability=(0.6, 0.8))


@pytest.fixture(scope="module")
def study_data(tmp_path_factory, tiny_models) -> Path:
    from experiments.caching.targets import cache_targets

    root = tmp_path_factory.mktemp("study_data")
    generate(STUDY, root, simulate(STUDY))
    cache_targets(root, [1, 2, 3], root / "targets", text_model=str(tiny_models))
    return root


@pytest.mark.slow
def test_one_session_transfer_reaches_the_full_data_model_and_beats_the_same_parameters_from_scratch(
        study_data, tmp_path, capsys):
    out = tmp_path / "transfer"
    assert transfer_study.main(["--data", str(study_data), "--out", str(out),
                                "--runs", "source", "full", "transfer", "same_from_scratch"]) == 0
    record = json.loads((out / "transfer_study.json").read_text())
    rows = {r["run"]: r for r in record["rows"]}
    print(capsys.readouterr().out)
    assert rows["transfer"]["sessions"] == 1 and rows["full"]["sessions"] == "all"
    assert "capacity_factor: 1.0" in (out / "transfer" / "run" / "config.yaml").read_text()  # the paper's
    assert rows["transfer"]["trainable_parts"] == ["new_adapters", "routers"]
    # the new adapter and the routers (gates and the per-unit affinities of scoring: unit)
    assert rows["transfer"]["trainable"] == rows["same_from_scratch"]["trainable"] == 240 * 128 + 128 + 1054
    assert rows["full"]["fwd_top1"] >= 0.4  # far above chance (1 / 40): the comparison means something
    assert record["ratio_to_full"] >= 0.8, record["rows"]
    assert rows["transfer"]["fwd_top1"] >= 2 * rows["same_from_scratch"]["fwd_top1"] + 0.1, record["rows"]
    assert record["provenance"]["git_commit"] is not None or "git_commit" in record["provenance"]


@pytest.mark.slow
def test_the_narrowest_bottleneck_halves_retrieval_and_the_report_tabulates_and_plots_it(study_data, tmp_path):
    runs = tmp_path / "bottleneck"
    for width in (1, 64):
        fit_and_test(TINY_STUDY, [f"--data.init_args.data_dir={study_data}", "--data.init_args.subjects=[subj01]",
                                  f"--model.init_args.b_size={width}",
                                  f"--data.init_args.val_cache_dir={tmp_path / 'val_cache'}"], runs, f"b{width}")
        (runs / f"b{width}" / "run" / "test_metrics.json").unlink()  # the report must test the saved run itself
    out = tmp_path / "report"
    assert bottleneck_report.main(["--runs", str(runs), "--out", str(out)]) == 0
    summary = {r["b_size"]: r for r in json.loads((out / "bottleneck.json").read_text())["summary"]}
    assert set(summary) == {1, 64}
    assert summary[64]["fwd_top1"] >= 0.3
    assert summary[1]["fwd_top1"] <= 0.5 * summary[64]["fwd_top1"], summary
    assert (out / "bottleneck.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "bottleneck.csv").read_text().splitlines()[0].startswith("target,b_size,subjects,fwd_top1")
    assert bottleneck_report.main(["--runs", str(tmp_path / "nothing"), "--out", str(out)]) == 2
