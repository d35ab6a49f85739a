"""Stage-1 interpretability (``python -m experiments.interpret``): the planted positive control (voxel-expert maps
recover the ROIs above a permutation null; category-selective ROIs rank first for their category), every command
end to end on the tiny config, and the numerical parts checked against straightforward loops, numpy and
scikit-learn."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = [str(REPO / "configs/base/trainer.yaml"), str(REPO / "configs/stage1/tiny_synthetic.yaml")]


def interpret(args: list[str]) -> int:
    """``python -m experiments.interpret ARGS`` in this process; its exit status (bad input: 2)."""
    from experiments._cli import run_main
    from experiments.interpret import main

    return run_main(main, args)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def config_args(configs: list[str]) -> list[str]:
    return [a for c in configs for a in ("--config", c)]


# ------------------------------------------------------------------------------------------ positive control
@pytest.fixture(scope="module")
def positive_control(tmp_path_factory) -> Path:
    """The planted subject made, fitted (2 short epochs, seeded) and analysed through the command."""
    out = tmp_path_factory.mktemp("positive_control")
    assert interpret(["positive-control", "--out", str(out), "--steps", "8", "--permutations", "1000"]) == 0
    return out


def test_planted_subject_voxels_carry_their_own_factor_only():
    from datamodules.synthetic import PLANTED_FACTORS, ROI_NAMES, planted_latents, planted_targets, simulate
    from experiments.interpretability.positive_control import planted_config

    sim = simulate(planted_config(seed=0))
    model, table = sim.subjects["subj01"], sim.trials["subj01"]
    z = planted_latents(sim.factors)  # (N_universe, 8)
    betas = sim.raw_betas["subj01"]
    betas = (betas - betas.mean(0)) / betas.std(0)
    for k, name in enumerate(PLANTED_FACTORS):
        roi_mean = betas[:, model.roi == ROI_NAMES.index(name)].mean(1)
        corr = [np.corrcoef(roi_mean, z[table.nsd_id, j])[0, 1] for j in range(z.shape[1])]
        assert corr[k] > 0.9 and max(abs(c) for j, c in enumerate(corr) if j != k) < 0.35, (name, corr)
    targets = planted_targets(sim.factors, 32, 1)  # orthonormal embedding: norms kept, factors recoverable
    assert np.allclose(np.linalg.norm(targets, axis=1), np.linalg.norm(z, axis=1), rtol=1e-4)


def test_positive_control_voxel_maps_recover_the_planted_rois(positive_control):
    rows = {r["assignment"]: r for r in read_csv(positive_control / "voxel_maps" / "roi_agreement.csv")}
    print("\npositive control, AMI of voxel-expert maps with the planted ROIs (null: 1000 permutations):")
    for name, r in rows.items():
        print(f"  {name:40s} AMI {float(r['ami']):.3f}  null 99th pct {float(r['null_p99']):.3f}")
    clustered = next(r for name, r in rows.items() if name.startswith("all levels"))
    assert float(clustered["ami"]) > float(clustered["null_p99"])
    assert float(clustered["p_value"]) <= 0.01
    finest = rows["level 3 argmax expert"]
    assert float(finest["ami"]) > float(finest["null_p99"])


def test_category_selective_rois_rank_first_for_their_category(positive_control):
    ranking = json.loads((positive_control / "semantic" / "roi_ranking.json").read_text())
    assert len(ranking) >= 5  # the test images' categories, from the data
    for category, rois in ranking.items():
        assert rois[0] == f"category_{category}", (category, rois[:3])


def test_positive_control_report_shows_every_figure(positive_control):
    html = (positive_control / "report.html").read_text()
    figures = sorted(p.relative_to(positive_control).as_posix() for p in positive_control.rglob("*.png")
                     if "fit" not in p.parts and "data" not in p.parts)
    assert figures and all(f"src='{f}'" in html for f in figures)
    assert "class='missing'" not in html
    record = json.loads((positive_control / "provenance.json").read_text())
    assert record["checkpoint"].endswith("last.ckpt") and record["git_commit"]
    assert record["resolved_config"]["model"]["init_args"]["target"] == "factors"


def _assert_opens_in_chromium(report: Path, open_in_chromium) -> None:
    """Every figure of the report loads in real Chromium and the page logs no error."""
    check = open_in_chromium(report)
    assert not check.problems(), "\n".join([f"{report} in Chromium:", *check.problems()])
    figures = report.read_text().count("<img ")
    assert len(check.images) == check.img_tags == figures > 0
    print(f"\n{report.parent.name}: {len(check.images)} images loaded in Chromium, no console error")


@pytest.mark.slow
def test_positive_control_report_opens_in_chromium(positive_control, open_in_chromium):
    _assert_opens_in_chromium(positive_control / "report.html", open_in_chromium)


# ------------------------------------------------------------------------------------------ tiny config, end to end
@pytest.fixture(scope="module")
def tiny_run(small_data, targets, stage1_checkpoints, tmp_path_factory) -> dict:
    """`all` on the tiny text-target stage-1 fit of the small synthetic dataset (8 test images, 4 IG steps)."""
    out = tmp_path_factory.mktemp("interpret_all")
    args = [*config_args(TINY), "--ckpt", str(stage1_checkpoints["text"]), f"--data.init_args.data_dir={small_data}",
            "--max-images", "8", "--steps", "4", "--permutations", "200"]
    assert interpret(["all", "--out", str(out), *args]) == 0
    return {"out": out, "args": args, "ckpt": stage1_checkpoints["text"],
            "data": [f"--data.init_args.data_dir={small_data}"]}


def test_all_writes_every_analysis_and_its_report(tiny_run, small_sim):
    import nibabel as nib

    out = tiny_run["out"]
    for name in ("voxel_maps/adapter_level0.npy", "voxel_maps/ig_level3.npy", "voxel_maps/roi_agreement.csv",
                 "semantic/selectivity_level0.csv", "semantic/paths_per_category.csv", "ica/spatial_maps.npy",
                 "ica/category_statistics.csv", "usage/levels.csv", "usage/experts.csv", "provenance.json"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    for png in out.rglob("*.png"):
        assert f"src='{png.relative_to(out).as_posix()}'" in html
    assert html.count("<section>") >= 7
    # NIfTI volumes in the subject's space: voxel v of the arrays sits at the subject's v-th mask position
    maps = np.load(out / "voxel_maps/ig_level1.npy")  # (4, V)
    volume = np.asarray(nib.load(out / "voxel_maps/ig_level1.nii.gz").dataobj)
    model = small_sim.subjects["subj01"]
    assert volume.shape == (*model.volume_shape, 4)
    assert np.allclose(volume.reshape(-1, 4)[model.mask_flat_index].T, maps, rtol=1e-6)
    rows = read_csv(out / "voxel_maps/roi_agreement.csv")
    print("\ndefault-like synthetic data (tests' small set, 2-epoch fit), AMI vs null 99th pct:",
          [(r["assignment"], round(float(r["ami"]), 3), round(float(r["null_p99"]), 3)) for r in rows])


@pytest.mark.slow
def test_all_report_opens_in_chromium(tiny_run, open_in_chromium):
    _assert_opens_in_chromium(tiny_run["out"] / "report.html", open_in_chromium)


def test_usage_tables_are_the_routing_statistics_of_the_test_rows(tiny_run):
    from experiments.interpretability.loading import load_stage1_run, load_test_set

    run = load_stage1_run(tiny_run["ckpt"], TINY, tiny_run["data"])
    test = load_test_set(run, "subj01", 8)
    with torch.no_grad():
        out = run.model.encode(test.voxels[test.repeat_mask], "subj01")
    levels = read_csv(tiny_run["out"] / "usage/levels.csv")
    experts = read_csv(tiny_run["out"] / "usage/experts.csv")
    for level, routing in enumerate(out.routing):
        p = routing.probs.double().numpy()  # (rows, parents, units, children)
        rows, parents, units, children = p.shape
        entropy = -(p * np.log(p)).sum(-1).mean()
        mass = p.sum(2).sum(0).reshape(-1)
        taken = np.zeros((rows, parents, units))
        idx = routing.indices.numpy()  # (rows, E, k) in parent coordinates; expert e belongs to parent e // f
        for e in range(parents * children):
            np.add.at(taken, (np.arange(rows)[:, None], e // children, idx[:, e]), 1)
        coverage = [(taken == 0).mean(), (taken == 1).mean(), (taken >= 2).mean()]
        assert float(levels[level]["entropy_nats"]) == pytest.approx(entropy, rel=1e-5)
        got = [float(levels[level][f"coverage_{c}"]) for c in ("none", "one", "several")]
        assert np.allclose(got, coverage, atol=1e-6)
        share = [float(r["gate_mass_share"]) for r in experts if int(r["level"]) == level]
        assert np.allclose(share, mass / mass.sum(), rtol=1e-5)
        assert [int(r["parent"]) for r in experts if int(r["level"]) == level] == routing.parent.tolist()


def test_semantic_contribution_score_and_attribution_reuse(tiny_run):
    out = tiny_run["out"]
    before = (out / "attributions.npz").stat().st_mtime_ns
    assert interpret(["semantic", "--out", str(out), *tiny_run["args"]]) == 0  # same settings: IG reused
    assert (out / "attributions.npz").stat().st_mtime_ns == before
    other = out.parent / (out.name + "_contribution")
    assert interpret(["semantic", "--score", "contribution", "--out", str(other), *tiny_run["args"]]) == 0
    assert not (other / "attributions.npz").exists()
    paths = read_csv(other / "semantic/paths_per_image.csv")
    assert len(paths) == 8


@pytest.mark.parametrize("case", ["missing checkpoint", "unknown subject", "stage-2 config", "other target",
                                  "voxel counts"])
def test_bad_input_is_one_line_naming_the_option(case, tiny_run, small_data, tmp_path, capsys):
    from datamodules.synthetic import SyntheticNSDConfig, generate, simulate

    args = list(tiny_run["args"])
    expected = "--config"
    if case == "missing checkpoint":
        args[args.index("--ckpt") + 1] = str(tmp_path / "nothing.ckpt")
        expected = "--ckpt"
    elif case == "unknown subject":
        args += ["--subject", "7"]
        expected = "--subject"
    elif case == "stage-2 config":
        args = [*config_args([str(REPO / "configs/base/stage2_trainer.yaml"),
                              str(REPO / "configs/stage2/tiny_synthetic.yaml")]), "--ckpt", str(tiny_run["ckpt"])]
    elif case == "other target":
        args += ["--config", str(REPO / "configs/stage1/tiny_synthetic_image.yaml")]
    else:
        cfg = SyntheticNSDConfig(seed=1, voxels=(64,), num_sessions=2, trials_per_session=30, num_test_images=5,
                                 image_size=16)
        generate(cfg, tmp_path / "other", simulate(cfg))
        args[args.index(f"--data.init_args.data_dir={small_data}")] = f"--data.init_args.data_dir={tmp_path}/other"
        args.append("--data.init_args.subjects=[subj01]")
    assert interpret(["usage", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err


# ------------------------------------------------------------------------------------------ numerical parts
def tiny_moe_and_adapter(bottleneck: int | None):
    from lightning_modules.components.moe_encoder import HierarchicalMoE
    from lightning_modules.components.subject_adapters import SubjectAdapters

    torch.manual_seed(0)
    moe = HierarchicalMoE(hidden_dim=16, out_dim=8, num_blocks=1, clip_hidden=8, gate_init=1.0).eval()
    adapters = SubjectAdapters({"subj01": 10}, 16, bottleneck).eval()
    return moe.requires_grad_(False), adapters.requires_grad_(False)


@pytest.mark.parametrize("bottleneck,objective", [(None, "target"), (6, "backbone_sum")])
def test_integrated_gradients_equal_a_per_expert_loop_through_the_adapter(bottleneck, objective):
    from experiments.interpretability.attribution import (
        affine_adapter,
        expert_objectives,
        integrated_gradients,
    )

    moe, adapters = tiny_moe_and_adapter(bottleneck)
    x, steps = torch.randn(3, 10), 4
    target = torch.randn(3, 8) if objective == "target" else None
    weight, bias = affine_adapter(adapters, "subj01")
    got, delta = integrated_gradients(moe, weight, bias, x, target, steps, objective)
    columns = sum(moe.num_experts) + 1
    alphas = (torch.arange(steps) + 0.5) / steps
    expected = torch.zeros(columns, 3, 10)
    for j in range(columns):  # the definition: voxel gradients of one objective, through the adapter module
        points = (alphas[:, None, None] * x).reshape(-1, 10).requires_grad_(True)
        t = None if target is None else target.repeat(steps, 1)
        value = expert_objectives(moe(adapters(points, "subj01")), t, objective)[:, j].sum()
        expected[j] = torch.autograd.grad(value, points)[0].reshape(steps, 3, 10).mean(0) * x
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad():
        ends = [expert_objectives(moe(adapters(v, "subj01")), target, objective) for v in (x, 0 * x)]
    assert torch.allclose(delta, ends[0] - ends[1], atol=1e-5)


def test_level0_adapter_maps_equal_a_loop_over_rows_experts_and_units():
    from experiments.interpretability.attribution import affine_adapter
    from experiments.interpretability.voxel_maps import adapter_expert_maps

    moe, adapters = tiny_moe_and_adapter(6)
    weight, bias = affine_adapter(adapters, "subj01")
    x = torch.randn(5, 10)
    routing = moe(adapters(x, "subj01")).routing[0]
    row_weights = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    expected = torch.zeros(2, 10)
    for r in range(5):
        for e in range(2):
            for j, unit in enumerate(routing.indices[r, e].tolist()):
                expected[e] += row_weights[r] * routing.gates[r, e, j] * weight[unit].abs()
    assert torch.allclose(adapter_expert_maps(weight, routing.indices, routing.gates, row_weights), expected,
                          atol=1e-6)


def test_greedy_paths_descend_through_each_experts_own_children():
    from experiments.interpretability.semantic import greedy_paths
    from lightning_modules.components.moe_encoder import HierarchicalMoE

    moe = HierarchicalMoE(hidden_dim=32, out_dim=4, num_blocks=1, clip_hidden=4)
    parents = [getattr(moe, f"parent_{lv}").numpy() for lv in range(moe.num_levels)]
    levels = np.array([lv for lv, e in enumerate(moe.num_experts) for _ in range(e)] + [-1])
    importance = np.random.default_rng(0).random((50, len(levels)))
    importance[0] = 0  # columns: level 0 -> 0-1, level 1 -> 2-5, level 2 -> 6-13, level 3 -> 14-29, model -> 30
    importance[0, [1, 5, 13, 28]] = 1  # level 0: expert 1; its child 3; that one's child 7; its child 14
    importance[0, [2, 6, 14, 30]] = 9  # decoys: the best of each level, but children of another expert
    paths = greedy_paths(importance, levels, parents)
    assert paths[0].tolist() == [1, 3, 7, 14]
    for level in range(1, moe.num_levels):
        assert (parents[level][paths[:, level]] == paths[:, level - 1]).all()
        scores = importance[:, levels == level]
        children = parents[level][None, :] == paths[:, level - 1, None]
        best = np.where(children, scores, -np.inf).max(1)
        assert np.allclose(scores[np.arange(50), paths[:, level]], best)


def test_permutation_null_equals_scikit_learn_ami_of_the_same_shuffles():
    from sklearn.metrics import adjusted_mutual_info_score

    from experiments.interpretability.agreement import permutation_agreement, shuffles

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 200)
    assignment = (labels + (rng.random(200) < 0.5) * rng.integers(0, 7, 200)) % 7
    result = permutation_agreement("x", assignment, labels, permutations=30, seed=4)
    shuffled = shuffles(np.unique(assignment, return_inverse=True)[1], 31, 4)[1:]
    assert np.allclose(result.null, [adjusted_mutual_info_score(labels, s) for s in shuffled], atol=1e-9)
    assert result.ami == pytest.approx(adjusted_mutual_info_score(labels, assignment))
    assert result.above_null and result.p_value == pytest.approx(1 / 31)


def test_ica_finds_a_planted_category_component_with_welch_t_and_bh():
    from scipy import stats

    from experiments.interpretability.ica import loading_statistics, spatial_ica

    rng = np.random.default_rng(0)
    sources = rng.laplace(size=(3, 400)) ** 3  # sparse spatial maps
    member = np.zeros((60, 2), bool)
    member[:20, 0], member[20:40, 1] = True, True
    loadings = rng.normal(size=(60, 3))
    loadings[:20, 1] += 3.0  # component 1 loads on category "a"
    maps, found = spatial_ica(loadings @ sources, components=3, seed=0)
    match = np.abs(np.corrcoef(maps, sources)[:3, 3:]).argmax(0)  # found component of each true source
    rows = loading_statistics(found, member, ["a", "b"])
    by = {(r["component"], r["category"]): r for r in rows}
    assert by[(match[1], "a")]["q_fdr_bh"] < 1e-3
    t, p = stats.ttest_ind(found[:20, match[1]], found[20:, match[1]], equal_var=False)
    assert by[(match[1], "a")]["t"] == pytest.approx(t) and by[(match[1], "a")]["p"] == pytest.approx(p)
    ps = np.array([r["p"] for r in rows])
    order = np.argsort(ps)
    bh = np.minimum.accumulate((ps[order] * len(ps) / np.arange(1, len(ps) + 1))[::-1])[::-1]
    assert np.allclose(np.array([r["q_fdr_bh"] for r in rows])[order], np.minimum(bh, 1))


def test_report_escapes_text_truncates_tables_and_flags_missing_files(tmp_path):
    from experiments.interpretability.outputs import write_csv
    from experiments.interpretability.report import MAX_COLS, MAX_ROWS, ReportItem, write_report

    write_csv(tmp_path / "t.csv", [f"c{i}" for i in range(30)], [[r] * 30 for r in range(100)])
    path = write_report(tmp_path, "a <title>", [ReportItem("x", "one <b>\n\ntwo", ["nothing.png"], ["t.csv"])],
                        {"checkpoint": "c.ckpt"})
    html = path.read_text()
    assert "&lt;b&gt;" in html and "<b>" not in html and html.count("<p>") >= 2
    assert html.count("<tr>") == MAX_ROWS + 1 and f"{MAX_COLS} of 30 columns" in html
    assert "missing figure nothing.png" in html and "c.ckpt" in html
    assert not list(tmp_path.glob(".*tmp"))
