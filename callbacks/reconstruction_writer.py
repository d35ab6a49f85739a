"""Writes stage-2 ``predict`` outputs: reconstructions and the routing of every denoising step, resumably.

Layout under ``output_dir`` (default ``<log_dir>/reconstructions``), per subject:
``<subject>/images/<nsd_id:05d>.png`` (one PNG per test image), ``<subject>/routing/<nsd_id:05d>.npz`` (that image's
``{branch}_level_weights`` (steps, L), ``{branch}_spatial_level{l}`` (steps, G, E_l), ``timesteps`` (steps,)),
and at the end ``<subject>/reconstructions.npy`` (N, 3, H, W) uint8 in ``nsd_id`` order with ``<subject>/ids.npy``
and ``<subject>/manifest.json`` (sampler settings, provenance). Every file is written atomically and an image
counts as done once its PNG exists, so an interrupted ``predict`` resumes where it stopped (the module skips
those images). The assembled array is filled one image at a time (memory-mapped), so memory stays bounded.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

from datamodules.common import atomic_path, write_json_atomic


def done_ids(directory: Path) -> set[int]:
    """nsd_ids whose PNG exists in ``directory/images``."""
    return {int(p.stem) for p in (directory / "images").glob("*.png")}


def assemble(directory: Path) -> tuple[np.ndarray, Path]:
    """PNGs of ``directory/images`` -> ``reconstructions.npy`` (N, 3, H, W) uint8 sorted by id, ``ids.npy``."""
    ids = np.array(sorted(done_ids(directory)), dtype=np.int64)
    target = directory / "reconstructions.npy"
    if len(ids):
        first = np.asarray(Image.open(directory / "images" / f"{ids[0]:05d}.png").convert("RGB"))
        with atomic_path(target) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                              shape=(len(ids), 3, *first.shape[:2]))
            for row, i in enumerate(ids):
                array[row] = np.asarray(Image.open(directory / "images" / f"{i:05d}.png").convert("RGB")
                                        ).transpose(2, 0, 1)
            array.flush()
            del array
    with atomic_path(directory / "ids.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, ids)
    return ids, target


class ReconstructionWriter(L.Callback):
    """Write each predicted image as soon as its batch ends; assemble per subject at the end (rank zero)."""

    def __init__(self, output_dir: str | None = None):
        super().__init__()
        self.output_dir = output_dir

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions")

    def on_predict_start(self, trainer, pl_module) -> None:
        subjects = list(getattr(trainer.datamodule, "subjects", None) or [])
        pl_module.skip_ids = {s: done_ids(self._dir(trainer) / s) for s in subjects}
        skipped = sum(len(v) for v in pl_module.skip_ids.values())
        if skipped and trainer.is_global_zero:
            print(f"resuming: {skipped} reconstructions already in {self._dir(trainer)}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None or "images" not in outputs:
            return
        out = self._dir(trainer) / outputs["subject"]
        routing = outputs.get("routing", {})
        for row, nsd_id in enumerate(outputs["nsd_id"].tolist()):
            per_image = {k: (v.numpy() if k == "timesteps" else v[:, row].numpy()) for k, v in routing.items()}
            with atomic_path(out / "routing" / f"{nsd_id:05d}.npz") as tmp, open(tmp, "wb") as handle:
                np.savez(handle, **per_image)
            image = outputs["images"][row].permute(1, 2, 0).numpy()
            with atomic_path(out / "images" / f"{nsd_id:05d}.png") as tmp:
                Image.fromarray(image).save(tmp, format="PNG")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            trainer.strategy.barrier("reconstruction_writer")
        if not trainer.is_global_zero:
            return
        h = pl_module.hparams
        for subject in getattr(trainer.datamodule, "subjects", None) or []:
            directory = self._dir(trainer) / subject
            ids, _ = assemble(directory)
            write_json_atomic(directory / "manifest.json", {
                "subject": subject, "num_images": int(len(ids)),
                "sampler": {k: h.get(k) for k in ("sampler", "inference_steps", "guidance_scale",
                                                  "negative_prompt", "seed", "resolution")},
                "provenance": pl_module.provenance() if hasattr(pl_module, "provenance") else {}})
