"""Ground truth beside reconstruction, as one PNG (the demo's picture of stage 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.common import atomic_path
from experiments.caching.targets import unique_images


def comparison_grid(data_dir: str | Path, subject: str, reconstructions: str | Path, out: str | Path,
                    max_images: int = 8) -> Path:
    """Rows of [ground truth | reconstruction] for the first ``max_images`` reconstructed test images of
    ``subject`` (``reconstructions`` = the writer's ``<subject>`` directory) -> ``out`` PNG."""
    directory = Path(reconstructions)
    ids = sorted(int(p.stem) for p in (directory / "images").glob("*.png"))[:max_images]
    if not ids:
        raise FileNotFoundError(f"no reconstructions in {directory / 'images'}: run predict first")
    wanted = set(ids)
    truth = {i: image for i, image, _ in unique_images(data_dir, [subject]) if i in wanted}
    rows = []
    for i in ids:
        recon = Image.open(directory / "images" / f"{i:05d}.png").convert("RGB")
        gt = Image.fromarray(truth[i]).resize(recon.size, Image.BICUBIC)
        rows.append(np.concatenate([np.asarray(gt), np.asarray(recon)], 1))
    with atomic_path(out) as tmp:
        Image.fromarray(np.concatenate(rows, 0)).save(tmp, format="PNG")
    return Path(out)
