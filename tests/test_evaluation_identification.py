"""N-way CLIP identification of reconstructions, against numpy, with a CLIP smaller than 224 px (the world's)."""

from __future__ import annotations

import numpy as np
import torch

from experiments.evaluation.inputs import ImageSet, find_reconstructions, load_test_images
from experiments.evaluation.networks import NETWORKS, FeatureNetwork
from experiments.evaluation.preprocessing import to_eval_size
from experiments.evaluation.suite import EvaluationConfig, Evaluator
from tests.test_evaluation import fake_reconstructions


def _small_clip(directory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=8, projection_dim=16))
    model.save_pretrained(directory / "clip32")
    return directory / "clip32"


def test_clip_top1_and_cosine_equal_numpy_on_the_same_features(small_data, tmp_path):
    recons = tmp_path / "recons"
    fake_reconstructions(small_data, recons, noise_every=3)
    clip = _small_clip(tmp_path)
    result = Evaluator(EvaluationConfig(weights={"clip": str(clip)}, metrics=("clip", "clip_top1", "clip_cosine"),
                                        bootstrap=0)).subject(small_data, recons, 1)
    network = FeatureNetwork(NETWORKS["clip"], clip)
    ids, truth = load_test_images(small_data, 1)
    paths, _ = find_reconstructions(recons, "subj01", ids, True)

    def features(images: ImageSet, n: int) -> np.ndarray:
        batch = torch.cat([to_eval_size(image[None], False) for image in images.batch(0, n)])
        return network(batch)["clip"].double().numpy()

    gt, rec = features(ImageSet(images=truth), len(ids)), features(ImageSet(paths=paths), len(ids))
    r = np.corrcoef(gt, rec)[: len(ids), len(ids):]  # r[i, j]: GT i against reconstruction j
    expected_top1 = 100 * np.mean(r.argmax(0) == np.arange(len(ids)))
    expected_two_way = 100 * np.mean([(r[:, j] < r[j, j]).sum() / (len(ids) - 1) for j in range(len(ids))])
    assert result.values["clip_top1"] == expected_top1
    assert abs(result.values["clip"] - expected_two_way) < 1e-9
    cosine = np.sum(gt * rec, 1) / np.linalg.norm(gt, axis=1) / np.linalg.norm(rec, axis=1)
    assert abs(result.values["clip_cosine"] - cosine.mean()) < 1e-9
    assert np.mean(cosine > 1 - 1e-6) >= 0.6  # two thirds are the ground truth itself: cosine 1
    # two thirds are the ground truth itself (always first); the noise images almost never are
    assert 60.0 <= expected_top1 < 100.0
