"""Fresh scenes for the world: the synthetic generator's factor distribution with the world's own seed.

Never the dataset's images: every part draws its own scenes from ``sample_factors`` with a seed of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.synthetic import (
    COLOURS,
    OBJECT_WORDS,
    TEXTURES,
    SceneFactors,
    describe,
    render_image,
    sample_factors,
)

NUM_TEMPLATES = 5


@dataclass
class Scenes:
    """images: (N, S, S, 3) uint8; factors: the generator's factors (arrays (N,)); captions: N lists of the 5
    caption templates (template 0 names size, colour, texture, object and quadrant)."""

    images: np.ndarray
    factors: SceneFactors
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self) -> np.ndarray:
        """(N, 3, S, S) float32 in [0, 1]."""
        return self.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    def quadrant(self) -> np.ndarray:
        """(N,) 0..3: 2 * bottom + right."""
        return (2 * (self.factors.cy >= 0.5) + (self.factors.cx >= 0.5)).astype(np.int64)


def make_scenes(seed: int, n: int, image_size: int) -> Scenes:
    """``n`` scenes of ``image_size`` px drawn with ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    f = sample_factors(rng, n)
    images = np.stack([render_image(f, i, image_size) for i in range(n)]) if n else \
        np.zeros((0, image_size, image_size, 3), np.uint8)
    return Scenes(images=images, factors=f, captions=[describe(f, i, NUM_TEMPLATES) for i in range(n)])


def all_caption_words() -> list[str]:
    """Every caption of a factor grid that takes every value of every factor (what the tokenizer must cover)."""
    n_cat, n_col, n_tex = len(OBJECT_WORDS), len(COLOURS), len(TEXTURES)
    grid = np.stack(np.meshgrid(np.arange(n_cat), np.arange(n_col), np.arange(n_tex), np.arange(3), np.arange(4),
                                np.arange(2), indexing="ij"), -1).reshape(-1, 6)
    sizes, pos, light = np.array([0.15, 0.2, 0.25]), np.array([0.4, 0.6]), np.array([0.3, 0.7])
    f = SceneFactors(category=grid[:, 0], colour=grid[:, 1], texture=grid[:, 2], size=sizes[grid[:, 3]],
                     cx=pos[grid[:, 4] % 2], cy=pos[grid[:, 4] // 2], background=light[grid[:, 5]])
    return [c for i in range(len(grid)) for c in describe(f, i, NUM_TEMPLATES)]
