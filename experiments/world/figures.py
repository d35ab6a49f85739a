"""The world's two figures: caption -> image samples and the IP-Adapter ceiling (truth | reconstruction)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CELL = 128


def _tile(pixels: np.ndarray) -> Image.Image:
    """(3, S, S) in [0, 1] -> a CELL x CELL PIL image (nearest-neighbour upscale)."""
    img = Image.fromarray((np.clip(pixels, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8))
    return img.resize((CELL, CELL), Image.NEAREST)


def samples_grid(captions: list[str], images: np.ndarray, columns: int = 4) -> Image.Image:
    """Caption-conditioned samples (N, 3, S, S) with their caption drawn under each one."""
    rows = (len(images) + columns - 1) // columns
    text_h, width = 30, CELL + 100
    sheet = Image.new("RGB", (columns * width, rows * (CELL + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (cap, img) in enumerate(zip(captions, images)):
        x, y = (k % columns) * width, (k // columns) * (CELL + text_h)
        sheet.paste(_tile(img), (x + 50, y))
        words, lines = cap.split(), [""]
        for w in words:
            if len(lines[-1]) + len(w) > 36:
                lines.append("")
            lines[-1] = (lines[-1] + " " + w).strip()
        draw.multiline_text((x + 4, y + CELL + 2), "\n".join(lines[:2]), fill="black", spacing=1)
    return sheet


def ceiling_grid(truth: np.ndarray, recon: np.ndarray, shuffled: np.ndarray | None = None) -> Image.Image:
    """Rows of truth | reconstruction from its own image embedding (| from a shuffled one)."""
    cols = 3 if shuffled is not None else 2
    head = 16
    sheet = Image.new("RGB", (2 * cols * CELL, head + (len(truth) + 1) // 2 * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    names = ["truth", "IP recon", "shuffled emb"][:cols]
    for half in range(2):
        for c, name in enumerate(names):
            draw.text((half * cols * CELL + c * CELL + 4, 2), name, fill="black")
    for k in range(len(truth)):
        x, y = (k % 2) * cols * CELL, head + (k // 2) * CELL
        for c, img in enumerate([truth[k], recon[k]] + ([shuffled[k]] if shuffled is not None else [])):
            sheet.paste(_tile(img), (x + c * CELL, y))
    return sheet
