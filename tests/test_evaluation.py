"""The evaluation suite: the MindEye2 recipe's arithmetic against plain numpy / scipy / scikit-image loops, every
feature network's node on random weights loaded from local files, skips and --strict, and the command end to end
on the small synthetic dataset. Networks carry random weights: these tests check plumbing and arithmetic, not
published values."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experiments.evaluate import main  # noqa: E402
from experiments.evaluation import bootstrap as B  # noqa: E402
from experiments.evaluation import preprocessing as P  # noqa: E402
from experiments.evaluation import suite  # noqa: E402
from experiments.evaluation.inputs import load_test_images  # noqa: E402
from experiments.evaluation.low_level import low_level_metrics, pixcorr, ssim  # noqa: E402
from experiments.evaluation.networks import NETWORKS, FeatureNetwork  # noqa: E402
from experiments.evaluation.paired_scores import correlation_distance  # noqa: E402
from experiments.evaluation.retrieval import retrieval_mindeye2  # noqa: E402
from experiments.evaluation.two_way import two_way_identification  # noqa: E402
from lightning_modules.components.target_embedders import MissingWeightsError  # noqa: E402

SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, 3, size, size) float64 images in [0, 1] with structure (SSIM of noise alone is near 0)."""
    base = torch.from_numpy(rng.random((n, 3, 8, 8)))
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).numpy()


# ---------------------------------------------------------------- preprocessing and low-level metrics
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_is_torchvision_tensor_resize(antialias):
    from torchvision.transforms import InterpolationMode, Resize

    x = torch.rand(2, 3, 224, 224)
    for size, mode, tv_mode in ((256, "bilinear", InterpolationMode.BILINEAR), (425, "bilinear",
                                InterpolationMode.BILINEAR), (224, "bicubic", InterpolationMode.BICUBIC)):
        expected = Resize((size, size), interpolation=tv_mode, antialias=antialias)(P.resize(x, 256, antialias))
        ours = P.resize(P.resize(x, 256, antialias), size, antialias, mode)
        assert torch.allclose(ours, expected, atol=1e-6)
    assert P.resize(x, 224) is x  # same size: unchanged, as torchvision


def test_pixcorr_and_ssim_agree_with_scikit_image_per_image():
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    gt = smooth_images(rng, 2, 425)
    rec = np.clip(gt + 0.15 * rng.standard_normal(gt.shape), 0, 1)
    ours_ssim = ssim(torch.from_numpy(gt), torch.from_numpy(rec)).numpy()
    ours_pix = pixcorr(torch.from_numpy(gt), torch.from_numpy(rec)).numpy()
    for i in range(len(gt)):
        g, r = gt[i].transpose(1, 2, 0), rec[i].transpose(1, 2, 0)
        assert abs(ours_ssim[i] - structural_similarity(rgb2gray(g), rgb2gray(r), **SK_SSIM)) < 1e-6
        assert abs(ours_pix[i] - np.corrcoef(g.ravel(), r.ravel())[0, 1]) < 1e-6
    # the full recipe from 256 px (resize to 425 in float32, as torchvision) against skimage on the same pixels
    gt256, rec256 = torch.rand(3, 3, 256, 256), torch.rand(3, 3, 256, 256)
    low = low_level_metrics(gt256, rec256)
    g425, r425 = P.PIXCORR(gt256).numpy().transpose(0, 2, 3, 1), P.PIXCORR(rec256).numpy().transpose(0, 2, 3, 1)
    for i in range(3):
        expected = structural_similarity(rgb2gray(g425[i].astype(np.float64)), rgb2gray(r425[i].astype(np.float64)),
                                         **SK_SSIM)
        assert abs(low["ssim"][i].item() - expected) < 1e-6
        assert abs(low["pixcorr"][i].item() - np.corrcoef(g425[i].ravel(), r425[i].ravel())[0, 1]) < 1e-6


# ---------------------------------------------------------------- identical and shuffled sets
def test_identical_sets_score_perfectly():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(smooth_images(rng, 3, 256)).float()
    low = low_level_metrics(images, images.clone())
    assert torch.allclose(low["pixcorr"], torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(low["ssim"], torch.ones(3, dtype=torch.float64), atol=1e-12)
    feats = torch.randn(320, 48)
    assert two_way_identification(feats, feats.clone(), batch_size=50)[0] == 1.0
    result = retrieval_mindeye2(feats, feats.clone())  # 320 > 300: 30 draws of 300
    assert (result.image, result.brain, result.draws, result.candidates) == (1.0, 1.0, 30, 300)


def test_shuffled_sets_score_chance():
    torch.manual_seed(2)
    # two-way identification of independent features: each reconstruction's score is uniform on [0, 1], so the
    # mean over 400 images is 0.5 with standard deviation 0.29 / sqrt(400) = 0.014; tolerance 4 sigma
    score, _ = two_way_identification(torch.randn(400, 64), torch.randn(400, 64), batch_size=128)
    assert abs(score - 0.5) < 0.06
    # 300-way retrieval of independent embeddings: chance is 1/300 = 0.0033 (9000 trials per direction)
    result = retrieval_mindeye2(torch.randn(500, 32), torch.randn(500, 32))
    assert result.image < 0.012 and result.brain < 0.012
    # PixCorr of noise against other noise: about 0
    a, b = torch.rand(4, 3, 256, 256), torch.rand(4, 3, 256, 256)
    assert low_level_metrics(a, b)["pixcorr"].abs().max() < 0.02


# ---------------------------------------------------------------- arithmetic against plain loops
def test_two_way_identification_matches_numpy_loop():
    rng = np.random.default_rng(3)
    gt = rng.standard_normal((25, 40)).astype(np.float32)
    rec = (gt + 1.5 * rng.standard_normal(gt.shape)).astype(np.float32)
    _, per_image = two_way_identification(torch.from_numpy(gt), torch.from_numpy(rec), batch_size=7)
    n = len(gt)
    expected = []
    for j in range(n):
        own = np.corrcoef(gt[j], rec[j])[0, 1]
        expected.append(sum(np.corrcoef(gt[i], rec[j])[0, 1] < own for i in range(n) if i != j) / (n - 1))
    assert np.array_equal(per_image, np.array(expected))
    # and MindEye2's vectorised formula
    r = np.corrcoef(gt, rec)[:n, n:]
    assert np.array_equal(per_image * (n - 1), np.sum(r < np.diag(r), 0))


def test_correlation_distance_matches_scipy():
    from scipy.spatial.distance import correlation

    rng = np.random.default_rng(4)
    gt, rec = rng.standard_normal((6, 1280)), rng.standard_normal((6, 1280))
    rec[0] = gt[0]
    ours = correlation_distance(torch.from_numpy(gt), torch.from_numpy(rec)).numpy()
    assert np.allclose(ours, [correlation(g, r) for g, r in zip(gt, rec)], atol=1e-12)


def test_retrieval_matches_numpy_loop_and_the_existing_metric():
    rng = np.random.default_rng(5)
    image = rng.standard_normal((350, 24))
    brain = image + 2.0 * rng.standard_normal(image.shape)
    result = retrieval_mindeye2(torch.from_numpy(brain), torch.from_numpy(image), candidates=300, draws=5, seed=42)
    subsets = np.random.RandomState(42)
    image_acc, brain_acc = [], []
    for _ in range(5):
        idx = subsets.choice(np.arange(350), size=300, replace=False)
        im = image[idx] / np.linalg.norm(image[idx], axis=1, keepdims=True)
        br = brain[idx] / np.linalg.norm(brain[idx], axis=1, keepdims=True)
        image_acc.append(np.mean([np.argmax(br @ im[i]) == i for i in range(300)]))  # per image: its brain
        brain_acc.append(np.mean([np.argmax(im @ br[j]) == j for j in range(300)]))  # per brain: its image
    assert abs(result.image - np.mean(image_acc)) < 1e-12 and abs(result.brain - np.mean(brain_acc)) < 1e-12
    assert abs(B.ratio(result.image_correct, result.appearances) - result.image) < 1e-12
    # with N <= candidates the existing lightning_modules.metrics.retrieval_top1(preds=brain, targets=image) is the
    # same measure with the directions named the other way round
    from lightning_modules.metrics import retrieval_top1

    small = retrieval_mindeye2(torch.from_numpy(brain[:120]), torch.from_numpy(image[:120]))
    fwd, bwd = retrieval_top1(torch.from_numpy(brain[:120]), torch.from_numpy(image[:120]))
    assert abs(fwd - small.brain) < 1e-6 and abs(bwd - small.image) < 1e-6


def test_bootstrap_interval_brackets_the_value_and_is_reproducible():
    rng = np.random.default_rng(6)
    values = rng.random(200)
    counts = B.resample_counts(200, 500, [0, 1])
    assert np.array_equal(counts, B.resample_counts(200, 500, [0, 1])) and (counts.sum(1) == 200).all()
    replicates = B.bootstrap_replicates(counts, values)
    low, high = B.percentile_interval(replicates)
    assert low < values.mean() < high and high - low < 0.2
    assert B.bootstrap_replicates(np.ones((1, 200)), values)[0] == pytest.approx(values.mean())
    # ratio of sums: two-way counts over N - 1 and retrieval correct over appearances reproduce the plain means
    assert B.ratio(np.array([3.0, 1.0]), 4.0) == pytest.approx(0.5)
    assert B.ratio(np.array([2.0, 0.0, 1.0]), np.array([2.0, 1.0, 1.0])) == pytest.approx(0.75)


# ---------------------------------------------------------------- networks from local random weights
def _save_random(name: str, directory: Path) -> Path:
    import torchvision.models as tv

    torch.manual_seed(0)
    if name == "clip":  # a tiny CLIPVisionModelWithProjection at CLIP's 224 px (cf. experiments/world/tiny_models.py)
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=224,
            patch_size=32, projection_dim=16))
        model.save_pretrained(directory / "tiny_clip")
        return directory / "tiny_clip"
    model = {"alexnet": lambda: tv.alexnet(weights=None),
             "inception": lambda: tv.inception_v3(weights=None, aux_logits=True, init_weights=False),
             "effnet": lambda: tv.efficientnet_b1(weights=None),
             "swav": lambda: tv.resnet50(weights=None)}[name]()
    state = model.state_dict()
    if name == "swav":  # the SwAV checkpoint layout: DDP prefixes, no fc, a projection head and prototypes
        state = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        state["module.prototypes.weight"] = torch.randn(3000, 128)
    path = directory / f"{name}.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("name, shapes", [
    ("alexnet", {"alexnet2": (192, 31, 31), "alexnet5": (256, 15, 15)}),
    ("inception", {"inception": (2048, 1, 1)}),
    ("effnet", {"effnet": (1280, 1, 1)}),
    ("swav", {"swav": (2048, 1, 1)}),
    ("clip", {"clip": (16,)}),
])
def test_feature_nodes_resolve_on_random_weights_loaded_from_files(name, shapes, tmp_path):
    path = _save_random(name, tmp_path)
    network = FeatureNetwork(NETWORKS[name], path)
    raw = network.nodes(torch.rand(1, 3, 256, 256))  # one 256 px image, resized by the network's preprocessing
    for metric, node in network.spec.nodes.items():
        assert tuple(raw[node].shape[1:]) == shapes[metric]
    features = network.flatten(raw)
    assert {k: v.shape for k, v in features.items()} == {k: (1, int(np.prod(s))) for k, s in shapes.items()}
    if name != "clip":
        saved = torch.load(path, weights_only=True)
        first = next(k for k in saved if k.endswith("weight"))
        loaded = dict(network.model.named_parameters())
        assert torch.equal(loaded[first.removeprefix("module.")], saved[first])
    assert not network.model.training


def test_a_file_for_the_wrong_network_is_an_error_naming_the_option(tmp_path):
    path = _save_random("effnet", tmp_path)
    with pytest.raises(MissingWeightsError, match="--alexnet"):
        FeatureNetwork(NETWORKS["alexnet"], path)
    with pytest.raises(MissingWeightsError, match="--swav: no weight file"):
        FeatureNetwork(NETWORKS["swav"], tmp_path / "absent.pth")


def test_lpips_uses_the_shipped_heads_and_the_local_alexnet(tmp_path):
    from experiments.evaluation.lpips_distance import LPIPSDistance

    path = _save_random("alexnet", tmp_path)
    metric = LPIPSDistance(path)
    saved = torch.load(path, weights_only=True)
    assert torch.equal(getattr(metric.model.net.slice2, "3").weight, saved["features.3.weight"])
    assert metric.model.lin0.model[1].weight.abs().sum() > 0  # the heads from lpips/weights/v0.1/alex.pth
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert torch.allclose(metric(a, a), torch.zeros(2, dtype=torch.float64), atol=1e-7)
    assert (metric(a, b) > 0).all()


def test_dreamsim_is_skipped_without_its_package_or_directory(monkeypatch, tmp_path):
    config = suite.EvaluationConfig(metrics=("dreamsim",))
    assert suite.skip_reasons(config) == {"dreamsim": "skipped: set --dreamsim"}
    monkeypatch.setattr(suite, "package_missing", lambda: "dreamsim package not installed (pip install ...)")
    config = suite.EvaluationConfig(weights={"dreamsim": str(tmp_path)}, metrics=("dreamsim",))
    assert suite.skip_reasons(config)["dreamsim"].startswith("skipped: dreamsim package not installed")
    from experiments.evaluation.dreamsim_distance import REQUIRED_FILES, missing_files

    assert missing_files(tmp_path) == list(REQUIRED_FILES)


# ---------------------------------------------------------------- inputs and the command
def test_test_images_are_the_data_layers_test_images(small_data):
    from experiments.caching.targets import unique_images

    ids, images = load_test_images(small_data, 1)
    assert len(ids) == 20 and list(ids) == sorted(ids)
    everything = {i: image for i, image, _ in unique_images(small_data, ["subj01"])}
    assert all(np.array_equal(everything[int(i)], image) for i, image in zip(ids, images))


def fake_reconstructions(data: Path, out: Path, subject: int = 1, noise_every: int = 2) -> list[int]:
    """<out>/subjXX/images/<nsd_id>.png: the ground truth, except every ``noise_every``-th image is noise."""
    ids, images = load_test_images(data, subject)
    folder = out / f"subj{subject:02d}" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(subject)
    noise = []
    for k, (nsd_id, image) in enumerate(zip(ids, images)):
        if noise_every and k % noise_every == 1:
            image = rng.integers(0, 256, image.shape, dtype=np.uint8)
            noise.append(int(nsd_id))
        Image.fromarray(image).save(folder / f"{int(nsd_id):05d}.png")
    return noise


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_missing_weights_are_skipped_and_strict_exits_2(small_data, tmp_path, capsys):
    recons = tmp_path / "recons"
    fake_reconstructions(small_data, recons, noise_every=0)
    args = ["--recons", str(recons), "--data", str(small_data), "--subjects", "1", "--bootstrap", "0",
            "--metrics", "pixcorr", "ssim", "alexnet2", "swav", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    row = read_csv(tmp_path / "out" / "metrics.csv")[0]
    assert float(row["pixcorr"]) == pytest.approx(1.0, abs=1e-9) and float(row["ssim"]) == pytest.approx(1.0)
    assert row["alexnet2"] == "skipped: set --alexnet" and row["swav"] == "skipped: set --swav"
    capsys.readouterr()
    assert main(args + ["--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --strict") and "set --alexnet" in err and "set --swav" in err
    # a missing reconstruction is an error naming --recons
    next((recons / "subj01" / "images").iterdir()).unlink()
    assert main(args) == 2 and "--recons" in capsys.readouterr().err


def test_evaluate_end_to_end_writes_csv_and_json(small_data, tmp_path, capsys):
    recons = tmp_path / "recons"
    noise = fake_reconstructions(small_data, recons)
    alexnet, clip = _save_random("alexnet", tmp_path), _save_random("clip", tmp_path)
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"alexnet": alexnet.name, "clip": str(clip)}))  # relative to the file
    ids, _ = load_test_images(small_data, 1)
    rng = np.random.default_rng(7)
    target = rng.standard_normal((len(ids), 2, 8)).astype(np.float32)  # token-shaped embeddings are flattened
    embeddings = tmp_path / "predictions"
    embeddings.mkdir()
    np.savez(embeddings / "subj01.npz", nsd_id=ids[::-1], target=target[::-1],
             clip_mean=(target + 0.01 * rng.standard_normal(target.shape)).astype(np.float32)[::-1])
    out = tmp_path / "evaluation"
    code = main(["--recons", str(recons), "--data", str(small_data), "--subjects", "1", "--weights-config",
                 str(weights), "--embeddings", str(embeddings), "--bootstrap", "200", "--batch-size", "10",
                 "--metrics", "pixcorr", "ssim", "alexnet2", "alexnet5", "clip", "effnet", "image_retrieval",
                 "brain_retrieval", "lpips", "dreamsim", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "published (4.8)" in printed and ".322" in printed and "* Eff: skipped: set --effnet" in printed
    rows = read_csv(out / "metrics.csv")
    assert [r["kind"] for r in rows[:2]] == ["subject", "mean"] and rows[2]["kind"] == "anchor"
    subject = rows[0]
    assert subject["subject"] == "subj01" and subject["num_images"] == "20" and len(noise) == 10
    # half the reconstructions are the ground truth (PixCorr 1), half are noise (PixCorr about 0)
    assert 0.4 < float(subject["pixcorr"]) < 0.6
    assert float(subject["pixcorr_ci_low"]) < float(subject["pixcorr"]) < float(subject["pixcorr_ci_high"])
    assert float(subject["image_retrieval"]) == 100.0 and float(subject["brain_retrieval"]) == 100.0
    assert float(subject["alexnet2"]) > 50.0  # identical images are always identified
    assert subject["effnet"] == "skipped: set --effnet" and subject["dreamsim"].startswith("skipped: ")
    assert subject["clip"] == rows[1]["clip"]  # one subject: the mean is that subject
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["alexnet2"]["unit"] == "%" and report["settings"]["antialias"] is False
    assert report["provenance"]["git_commit"] and report["provenance"]["weights"]["alexnet"] == str(alexnet)
    assert report["results"][0]["notes"]["retrieval"]["embedding_shape"] == [2, 8]
    assert len(report["anchors"]) == 5
    per_image = np.load(out / "per_image" / "subj01.npz")
    assert np.array_equal(per_image["nsd_id"], ids) and float(subject["pixcorr"]) == pytest.approx(
        per_image["pixcorr"].mean())
    assert (per_image["pixcorr"][1::2] < 0.2).all() and np.allclose(per_image["pixcorr"][::2], 1.0)
