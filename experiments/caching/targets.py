"""Compute stage-1 targets once per image and store them in the data layer's target-cache format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from datamodules.common import DataFormatError
from datamodules.shard_format import INFO_KEY, decode_sample, load_subject_meta, subject_name
from datamodules.streams import raise_with_shard
from datamodules.target_cache import write_target_cache
from lightning_modules.components.target_embedders import ClipImageEmbedder, ClipTextEmbedder


def unique_images(data_dir: str | Path, subjects: list[str], load_images: bool = True,
                  ) -> Iterator[tuple[int, np.ndarray | None, list[str]]]:
    """Every distinct image of the subjects' train and test shards once: (nsd_id, (H, W, 3) uint8, captions)."""
    seen: set[int] = set()
    for subject in subjects:
        meta = load_subject_meta(data_dir, subject)
        shards = [s["shard"] for s in meta["sessions"]] + [s["shard"] for s in meta["test"]["shards"]]
        urls = [{"url": str(Path(data_dir) / meta["subject"] / s)} for s in shards]
        for raw in wds.tarfile_to_samples(handler=raise_with_shard)(urls):
            nsd_id = int(json.loads(raw[INFO_KEY])["nsd_id"])
            if nsd_id in seen:
                continue
            seen.add(nsd_id)
            sample = decode_sample(raw, load_image=load_images)
            yield nsd_id, sample["image"], sample["info"].get("captions", [])


def images_without_captions(data_dir: str | Path, subjects: list[str]) -> dict[str, tuple[int, int]]:
    """Per subject: (images whose samples carry no caption, images), over its train and test shards (the json
    members only; nothing is decoded)."""
    counts = {}
    for subject in subjects:
        meta = load_subject_meta(data_dir, subject)
        shards = [s["shard"] for s in meta["sessions"]] + [s["shard"] for s in meta["test"]["shards"]]
        urls = [{"url": str(Path(data_dir) / meta["subject"] / s)} for s in shards]
        captioned: dict[int, bool] = {}
        for raw in wds.tarfile_to_samples(handler=raise_with_shard)(urls):
            info = json.loads(raw[INFO_KEY])
            nsd_id = int(info["nsd_id"])
            captioned[nsd_id] = captioned.get(nsd_id, False) or any(str(c).strip() for c in info.get("captions", []))
        counts[meta["subject"]] = (sum(1 for v in captioned.values() if not v), len(captioned))
    return counts


def require_captions(data_dir: str | Path, subjects: list[str], option: str = "--text-model") -> None:
    """Refuse a text target over data without captions (it would embed "" for those images: a constant target)."""
    lacking = {s: c for s, c in images_without_captions(data_dir, subjects).items() if c[0]}
    if lacking:
        detail = ", ".join(f"{s}: {m} of {n} images" for s, (m, n) in lacking.items())
        raise DataFormatError(f"{option}: a text target needs captions, but images of {data_dir} have none "
                              f"({detail}); re-import with --captions FILE (python -m experiments.prepare_nsd)")


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def cache_targets(data_dir: str | Path, subjects: list[str | int], out_dir: str | Path,
                  image_model: str | None = None, text_model: str | None = None, image_tokens: bool = False,
                  batch_size: int = 64, device: str = "cpu") -> dict[str, Path]:
    """Write ``out_dir/clip_image`` (image model; with ``image_tokens`` also ``clip_image_tokens``, the patch
    tokens MindEye2 targets) and/or ``out_dir/clip_text`` (text model) caches over every image of ``subjects``;
    returns the written directories."""
    names = [subject_name(s) for s in subjects]
    if text_model:  # before any model loads: a text target over uncaptioned images is a constant
        require_captions(data_dir, names)
    out_dir, written = Path(out_dir), {}
    jobs = []
    if image_model:
        jobs.append(("clip_image", ClipImageEmbedder(image_model, option="--image-model"), "image_embeds"))
    if image_model and image_tokens:
        jobs.append(("clip_image_tokens", ClipImageEmbedder(image_model, option="--image-model", output="tokens"),
                     "post_layernorm(last_hidden_state)[:, 1:] (patch tokens, no projection)"))
    if text_model:
        jobs.append(("clip_text", ClipTextEmbedder(text_model, option="--text-model"),
                     "text_encoder_2 hidden_states[-2] at EOS, caption mean"))
    for name, embedder, layer in jobs:
        embedder.to(device)
        ids, values = [], []
        is_image = name.startswith("clip_image")
        for batch in _batches(unique_images(data_dir, names, load_images=is_image), batch_size):
            if is_image:
                images = torch.from_numpy(np.stack([b[1] for b in batch])).permute(0, 3, 1, 2).float() / 255
                emb = embedder(images.to(device))
            else:
                emb = embedder([b[2] for b in batch])
            ids += [b[0] for b in batch]
            values.append(emb.cpu().numpy().astype(np.float32))
        source = image_model if is_image else text_model
        written[name] = write_target_cache(out_dir / name, np.array(ids), np.concatenate(values),
                                           model=str(Path(source).resolve()), layer=layer,
                                           extra={"subjects": names, "data_dir": str(data_dir)})
    return written
