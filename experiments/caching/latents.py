"""Cache SDXL VAE latent distributions of every image once (stage 2's optional ``latents_key``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.shard_format import subject_name
from datamodules.target_cache import write_target_cache
from experiments.caching.targets import _batches, unique_images
from lightning_modules.sdxl_loading import check_sdxl_dir


@torch.no_grad()
def cache_latents(data_dir: str | Path, subjects: list[str | int], out_dir: str | Path, sdxl_dir: str | Path,
                  resolution: int | None = None, batch_size: int = 16, device: str = "cpu") -> Path:
    """Write ``out_dir`` as a target cache of (2, 4, h, w) float16 per image: the mean and standard deviation of
    the VAE's latent distribution for pixels in [-1, 1] at ``resolution`` (default: stored size), unscaled."""
    from diffusers import AutoencoderKL

    root = check_sdxl_dir(sdxl_dir, "--sdxl-dir")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True).to(device).eval()
    names = [subject_name(s) for s in subjects]
    ids, values = [], []
    for batch in _batches(unique_images(data_dir, names), batch_size):
        images = torch.from_numpy(np.stack([b[1] for b in batch])).permute(0, 3, 1, 2).float().div(255)
        if resolution and images.shape[-1] != resolution:
            images = F.interpolate(images, size=(resolution, resolution), mode="bicubic", antialias=True)
        dist = vae.encode(images.clamp(0, 1).to(device) * 2 - 1).latent_dist
        values.append(torch.stack([dist.mean, dist.std], 1).cpu().numpy().astype(np.float16))
        ids += [b[0] for b in batch]
    return write_target_cache(out_dir, np.array(ids), np.concatenate(values), model=str(Path(root).resolve()),
                              layer=f"vae latent_dist (mean, std) at {resolution or 'stored'} px, input 2x-1",
                              extra={"subjects": names, "data_dir": str(data_dir), "resolution": resolution})
