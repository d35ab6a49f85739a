"""Small figures drawn with PIL and numpy (no matplotlib: it costs seconds on first use): labelled heatmaps and
grids of voxel maps, returned as (H, W, 3) uint8 arrays for ``outputs.write_png``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLUE, WHITE, RED = np.array([33, 102, 172.0]), np.array([247, 247, 247.0]), np.array([178, 24, 43.0])
DARK = np.array([8, 29, 88.0])


def colourise(values: np.ndarray, diverging: bool, limit: float | None = None) -> np.ndarray:
    """(...) floats -> (..., 3) uint8. Diverging: blue (-limit) - white (0) - red (+limit); sequential: white (min)
    to dark blue (max). NaN is grey."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if diverging:
        lim = limit if limit is not None else (np.abs(v[finite]).max() if finite.any() else 1.0)
        t = np.clip(np.where(finite, v, 0) / (lim or 1.0), -1, 1)[..., None]
        rgb = np.where(t >= 0, WHITE + t * (RED - WHITE), WHITE + (-t) * (BLUE - WHITE))
    else:
        lo = v[finite].min() if finite.any() else 0.0
        hi = limit if limit is not None else (v[finite].max() if finite.any() else 1.0)
        t = np.clip((np.where(finite, v, lo) - lo) / ((hi - lo) or 1.0), 0, 1)[..., None]
        rgb = WHITE + t * (DARK - WHITE)
    rgb = np.where(finite[..., None], rgb, 160.0)
    return np.round(rgb).astype(np.uint8)


def heatmap(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            diverging: bool = True, cell: int = 22, annotate: bool = True) -> np.ndarray:
    """(R, C) values as a labelled heatmap (rows top to bottom, columns left to right, values printed in cells when
    ``annotate``), with the colour limit in the title."""
    from PIL import Image, ImageDraw

    values = np.asarray(values, dtype=np.float64)
    rows, cols = values.shape
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size and diverging else None
    scale = f"(colour limit +-{limit:.3g})" if diverging and limit is not None else \
        (f"(range {finite.min():.3g} .. {finite.max():.3g})" if finite.size else "")
    title = f"{title} {scale}"
    left = 8 + int(max([probe.textlength(str(s)) for s in row_labels] + [0]))
    top = 22 + int(max([probe.textlength(str(s)) for s in col_labels] + [0]))
    cw = max(cell, 6 + int(max([probe.textlength(f"{v:.2f}") for v in values.ravel()] + [0]))) if annotate else cell
    width, height = max(left + cols * cw + 10, 20 + int(probe.textlength(title)) + 10), top + rows * cell + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colours = colourise(values, diverging, limit)
    draw.text((6, 4), title, fill=(0, 0, 0))
    for c, label in enumerate(col_labels):  # vertical column labels
        text = Image.new("RGB", (int(probe.textlength(str(label))) + 2, 12), "white")
        ImageDraw.Draw(text).text((1, 0), str(label), fill=(0, 0, 0))
        rotated = text.rotate(90, expand=True)
        image.paste(rotated, (left + c * cw + (cw - 12) // 2, top - rotated.size[1] - 3))
    for r, label in enumerate(row_labels):
        draw.text((4, top + r * cell + (cell - 10) // 2), str(label), fill=(0, 0, 0))
        for c in range(cols):
            x0, y0 = left + c * cw, top + r * cell
            draw.rectangle([x0, y0, x0 + cw - 1, y0 + cell - 1], fill=tuple(int(x) for x in colours[r, c]))
            if annotate and np.isfinite(values[r, c]):
                ink = (255, 255, 255) if colours[r, c].astype(int).sum() < 300 else (0, 0, 0)
                draw.text((x0 + 3, y0 + (cell - 10) // 2), f"{values[r, c]:.2f}", fill=ink)
    return np.asarray(image)


def map_grid(maps: np.ndarray, labels: Sequence[str], title: str, diverging: bool = False, size: int = 96,
             columns: int = 8) -> np.ndarray:
    """(K, H, W) 2-D maps (e.g. maximum-intensity projections of voxel maps) as a grid of images about ``size``
    pixels wide (nearest-neighbour upscaling), one colour scale per map, each labelled."""
    from PIL import Image, ImageDraw

    k, h, w = maps.shape
    scale = max(1, size // max(h, w))
    columns = max(1, min(columns, k))
    tile_w, tile_h = max(w * scale, 60), h * scale + 14
    rows = -(-k // columns)
    image = Image.new("RGB", (columns * (tile_w + 6) + 6, rows * (tile_h + 6) + 24), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill=(0, 0, 0))
    for i in range(k):
        r, c = divmod(i, columns)
        x0, y0 = 6 + c * (tile_w + 6), 22 + r * (tile_h + 6)
        tile = Image.fromarray(colourise(maps[i], diverging)).resize((w * scale, h * scale), Image.NEAREST)
        image.paste(tile, (x0, y0 + 14))
        draw.text((x0, y0), str(labels[i]), fill=(0, 0, 0))
    return np.asarray(image)
