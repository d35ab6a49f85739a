"""Atomic writers for the analyses' files (arrays, tables, JSON, PNG): each goes to a temporary sibling first and
is renamed into place (``datamodules.common``), so an interrupted analysis leaves no half-written file."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import atomic_path, write_json_atomic


def write_npy(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(array))
    return Path(path)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Floats are written with 6 significant digits."""
    def cell(v: Any) -> Any:
        return f"{v:.6g}" if isinstance(v, (float, np.floating)) else v

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(header))
        writer.writerows([[cell(v) for v in row] for row in rows])
    return Path(path)


def write_json(path: Path, obj: Any) -> Path:
    write_json_atomic(path, obj)
    return Path(path)


def write_png(path: Path, image: np.ndarray) -> Path:
    """(H, W, 3) or (H, W) uint8 -> PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG")
    return Path(path)


def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    """A float32 volume (X, Y, Z[, N]) with ``affine`` as a gzipped NIfTI-1 file (nibabel)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), mtime=0))
    return Path(path)


def write_figure(path: Path, fig, dpi: int = 110) -> Path:
    """A matplotlib figure -> PNG at ``path`` (atomic); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    return Path(path)
