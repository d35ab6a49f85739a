"""The world's quality figures on held-out fresh scenes, each beside its control.

CLIP: image -> caption top-1 retrieval among N (template 0, the full description; a retrieved caption counts when
its text equals the truth's, chance = 1 / N) and linear-probe accuracy (logistic regression fitted on held-out A,
scored on held-out B) of colour, shape (category), texture and position (quadrant) from ``image_embeds``.
VAE: SSIM (grayscale) and PixCorr of reconstructions. UNet: world-CLIP cosine of caption-conditioned samples with
their own captions vs shuffled captions. IP-Adapter ceiling: two-way identification, PixCorr and SSIM of
reconstructions from the true image embedding vs from shuffled embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def retrieval_top1(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str]) -> float:
    """(N, P), (N, P), N captions -> fraction of images whose most similar caption is (textually) their own."""
    sim = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    best = sim.argmax(1).tolist()
    return float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)]))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy on (test_x, test_y) of a logistic regression fitted on (train_x, train_y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def factor_labels(scenes) -> dict[str, np.ndarray]:
    f = scenes.factors
    return {"colour": f.colour, "shape": f.category, "texture": f.texture, "position": scenes.quadrant()}


def probes(emb_a: np.ndarray, scenes_a, emb_b: np.ndarray, scenes_b) -> dict[str, float]:
    """Probe accuracy per factor (fit on A, score on B)."""
    la, lb = factor_labels(scenes_a), factor_labels(scenes_b)
    return {k: linear_probe(emb_a, la[k], emb_b, lb[k]) for k in la}


def pixcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, ...) x (N, ...) -> (N,) Pearson correlation over all pixels of each pair."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] pairs -> (N,) grayscale SSIM (skimage)."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    return np.array([structural_similarity(rgb2gray(x.transpose(1, 2, 0)), rgb2gray(y.transpose(1, 2, 0)),
                                           data_range=1.0) for x, y in zip(a, b)])


def two_way(recon_emb: torch.Tensor, truth_emb: torch.Tensor) -> float:
    """Two-way identification: fraction of (i, j != i) pairs where recon i is closer (cosine) to truth i than to
    truth j."""
    sim = F.normalize(recon_emb, dim=-1) @ F.normalize(truth_emb, dim=-1).T
    own = sim.diag()[:, None]
    off = ~torch.eye(len(sim), dtype=torch.bool)
    return float((own > sim)[off].float().mean())


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) with no fixed point (the shuffled control)."""
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if n < 2 or not (p == np.arange(n)).any():
            return p
