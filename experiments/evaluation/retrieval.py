"""300-way retrieval exactly as MindEye2's ``final_evaluations`` computes it.

30 times: draw 300 distinct indices (``np.random.choice(N, 300, replace=False)`` from a ``RandomState`` seeded
42, MindEye2's ``seed_everything(42)``), flatten and L2-normalise both sides, take the cosine-similarity matrix
and the top-1 accuracy in both directions; report the mean over draws. With N <= 300 one draw uses every item.

Direction convention (MindEye2's code, reference 4.4): its similarity helper returns the matrix transposed, so the
number it labels "fwd" and the papers report as **image retrieval** is computed per *image*: is the image's own
brain embedding the most similar of the candidates' brain embeddings; **brain retrieval** is computed per *brain
sample*: is its own image the most similar of the candidates' images. Both come from the same matrix.

Compared with ``lightning_modules.metrics.retrieval_top1(preds=brain, targets=image)``: same similarity and both
directions, but that function's ``fwd`` (per brain sample) is MindEye2's *brain* retrieval and its ``bwd`` is
*image* retrieval, and it draws subsets with a torch generator; with N <= candidates the two agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class RetrievalResult:
    image: float  # MindEye2 "fwd" / image retrieval: per image, its brain embedding ranks first
    brain: float  # MindEye2 "bwd" / brain retrieval: per brain sample, its image ranks first
    image_correct: np.ndarray  # (N,) draws in which image i was retrieved correctly
    brain_correct: np.ndarray  # (N,) draws in which brain sample i was retrieved correctly
    appearances: np.ndarray  # (N,) draws in which item i was a candidate
    candidates: int
    draws: int


def retrieval_mindeye2(brain: torch.Tensor | np.ndarray, image: torch.Tensor | np.ndarray, candidates: int = 300,
                       draws: int = 30, seed: int = 42, device: str | torch.device = "cpu") -> RetrievalResult:
    """Top-1 retrieval among ``min(candidates, N)`` items over ``draws`` random subsets. ``brain`` and ``image``:
    (N, ...) paired embeddings (any trailing shape; flattened)."""
    brain = torch.as_tensor(brain).flatten(1).float()
    image = torch.as_tensor(image).flatten(1).float()
    if brain.shape != image.shape:
        raise ValueError(f"brain {tuple(brain.shape)} and image {tuple(image.shape)} embeddings differ in shape")
    n = brain.shape[0]
    k = min(candidates, n)
    rounds = draws if n > candidates else 1
    rng = np.random.RandomState(seed)
    image_correct, brain_correct, appearances = np.zeros(n), np.zeros(n), np.zeros(n)
    image_acc, brain_acc = [], []
    labels = torch.arange(k, device=device)
    for _ in range(rounds):
        subset = rng.choice(np.arange(n), size=k, replace=False) if n > candidates else np.arange(n)
        index = torch.from_numpy(subset)
        emb_image = F.normalize(image[index].to(device), dim=-1)
        emb_brain = F.normalize(brain[index].to(device), dim=-1)
        sim = emb_image @ emb_brain.T  # rows: images, columns: brain samples
        img_ok = (sim.argmax(1) == labels).cpu().numpy()
        brain_ok = (sim.argmax(0) == labels).cpu().numpy()
        image_correct[subset] += img_ok
        brain_correct[subset] += brain_ok
        appearances[subset] += 1
        image_acc.append(img_ok.mean())
        brain_acc.append(brain_ok.mean())
    return RetrievalResult(float(np.mean(image_acc)), float(np.mean(brain_acc)), image_correct, brain_correct,
                           appearances, k, rounds)
