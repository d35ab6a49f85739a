"""Write stage 2's conditioning cache (``lightning_modules.condition_cache``): every trial of a stage-2 run's data
through each branch's frozen stage-1 encoder (and its prior, with the run's deterministic sampler settings), once.

The run's own config names everything: the stage-1 checkpoints (``model.image_encoder`` / ``model.text_encoder``),
each branch's ``source``, the prior sampler (``prior_steps``, ``prior_guidance``, ``prior_seed``),
``repeat_average``, ``frozen_dtype``, and the data (subjects, sessions, validation choice, evaluation batches).
Rows: every trial of the selected training sessions (one per trial, repeats kept apart), and every validation and
test image with its repeats averaged exactly as the run's evaluation batches average them (the data module's own
validation and test loaders, at the run's ``eval_batch_size``).

Atomic and resumable: a part is written into ``.part-k-of-n.tmp`` (values memory-mapped, so memory stays bounded
by one batch) with its progress recorded after every batch, and renamed into place when complete; a finished part
whose settings and encoder match is kept. Shardable: task ``k`` of ``n`` (``--shard`` / ``--num-shards``, by
default from ``RANK`` / ``WORLD_SIZE`` or ``SLURM_PROCID`` / ``SLURM_NTASKS``) takes every n-th batch of training
trials and every n-th evaluation batch (the unsharded run's batches, so the parts are bit-equal to it); the reader
joins the parts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from datamodules import NSDDataModule
from datamodules.common import DataFormatError, provenance, write_json_atomic
from datamodules.shard_format import FORMAT_VERSION, decode_sample
from datamodules.streams import raise_with_shard
from lightning_modules.condition_cache import CONDITION_FORMAT_VERSION, STORAGE, read_meta, voxel_checksums
from lightning_modules.sdxl_loading import DTYPES
from lightning_modules.stage1_conditions import FrozenStage1
from lightning_modules.stage1_files import weights_sha256

BRANCHES = ("image", "text")


def shard_from_environment() -> tuple[int, int]:
    """(task index, task count) of a DDP or Slurm launch; (0, 1) otherwise."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def branch_settings(model: dict[str, Any], branch: str) -> dict[str, Any]:
    """The ``SETTINGS`` a branch's cache is computed with, from the stage-2 ``model.init_args``."""
    spec = model[f"{branch}_branch"]
    source = spec.get("source", "prior") if isinstance(spec, dict) else spec.source
    return {"source": source, "prior_steps": model.get("prior_steps", 10),
            "prior_guidance": model.get("prior_guidance"), "prior_seed": model.get("prior_seed", 0),
            "repeat_average": model.get("repeat_average", "embeddings"),
            "frozen_dtype": model.get("frozen_dtype", "float32")}


def _training_trials(dm: NSDDataModule, subject: str, shard: int, num_shards: int,
                     batch_size: int) -> Iterator[dict[str, Any]]:
    """This shard's training trials of ``subject``: every n-th block of ``batch_size`` trials of the selected
    sessions, so that each shard encodes exactly the batches an unsharded run encodes (bit-equal rows: a batch's
    floating-point results may depend on its composition)."""
    sessions = set(dm.sessions(subject))
    shards = [dm.data_dir / subject / x["shard"] for x in dm.metas[subject]["sessions"] if x["session"] in sessions]
    urls = [{"url": str(p)} for p in shards]
    for g, raw in enumerate(wds.tarfile_to_samples(handler=raise_with_shard)(urls)):
        if (g // batch_size) % num_shards == shard:
            yield decode_sample(raw, load_image=False)


def _count_training_trials(dm: NSDDataModule, subject: str, shard: int, num_shards: int, batch_size: int) -> int:
    sessions = set(dm.sessions(subject))
    total = sum(len(x["nsd_ids"]) for x in dm.metas[subject]["sessions"] if x["session"] in sessions)
    return sum(min(batch_size, total - start) for start in range(shard * batch_size, total, num_shards * batch_size))


def _eval_batch_sizes(dm: NSDDataModule, subject: str) -> list[int]:
    """Rows of every evaluation batch of ``subject`` in loader order: validation, then test."""
    counts = [len(dm.val_ids(subject))] if dm.val_images else []
    counts.append(sum(len(x["nsd_ids"]) for x in dm.metas[subject]["test"]["shards"]))
    size = dm.eval_batch_size
    return [min(size, n - i) for n in counts for i in range(0, n, size)]


def _eval_batches(dm: NSDDataModule, index: int, shard: int, num_shards: int) -> Iterator[dict[str, Any]]:
    loaders = ([dm.val_dataloader()[index]] if dm.val_images else []) + [dm.test_dataloader()[index]]
    j = 0
    for loader in loaders:
        for batch in loader:
            if j % num_shards == shard:
                yield batch
            j += 1


class PartWriter:
    """One part's arrays, memory-mapped in its temporary directory, with the rows done per split."""

    def __init__(self, tmp: Path, meta: dict[str, Any], counts: dict[str, int], width: tuple[int, int]):
        self.tmp, self.meta = tmp, meta
        progress = tmp / "progress.json"
        resumable = progress.is_file() and (tmp / "meta.json").is_file() and _same(read_meta(tmp), meta)
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            stored = STORAGE[meta["dtype"]]
            for split, n in counts.items():
                np.lib.format.open_memmap(tmp / f"{split}_keys.npy", "w+", np.int64, (n, 4)).flush()
                np.lib.format.open_memmap(tmp / f"{split}_values.npy", "w+", stored, (n, *width)).flush()
            write_json_atomic(tmp / "meta.json", meta)
            write_json_atomic(progress, {s: 0 for s in counts})
        self.done = json.loads(progress.read_text())
        self.keys = {s: np.load(tmp / f"{s}_keys.npy", mmap_mode="r+") for s in counts}
        self.values = {s: np.load(tmp / f"{s}_values.npy", mmap_mode="r+") for s in counts}

    def write(self, split: str, keys: np.ndarray, values: np.ndarray) -> None:
        start = self.done[split]
        self.keys[split][start:start + len(keys)] = keys
        self.values[split][start:start + len(keys)] = values
        self.keys[split].flush()
        self.values[split].flush()
        self.done[split] = start + len(keys)
        write_json_atomic(self.tmp / "progress.json", self.done)

    def finish(self, final: Path) -> None:
        for split, keys in self.keys.items():
            if self.done[split] != len(keys):
                raise RuntimeError(f"{self.tmp}: {self.done[split]} of {len(keys)} {split} rows written")
        self.keys, self.values = {}, {}
        (self.tmp / "progress.json").unlink()
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.tmp, final)


_VOLATILE = ("provenance",)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two part metas describe the same computation (provenance aside)."""
    return {k: v for k, v in a.items() if k not in _VOLATILE} == {k: v for k, v in b.items() if k not in _VOLATILE}


def _rows(experts: list[torch.Tensor], valid: torch.Tensor | None = None) -> np.ndarray:
    """[(b, E_l, D)] -> (b, sum E, D) in the encoder's own dtype (bfloat16 as its raw 16 bits): stored exactly."""
    values = torch.cat(experts, 1).cpu()
    values = values if valid is None else values[valid]
    return values.view(torch.uint16).numpy() if values.dtype == torch.bfloat16 else values.numpy()


def _write_trials(writer: PartWriter, encoder: FrozenStage1, batch: list[dict[str, Any]], subject: str,
                  device: str) -> None:
    """Decoded training samples -> their keys (nsd_id, session, trial, crc) and expert rows."""
    voxels = torch.from_numpy(np.stack([s["voxels"] for s in batch]).astype(np.float32))
    info = [s["info"] for s in batch]
    keys = np.stack([np.array([x[k] for x in info], dtype=np.int64) for k in ("nsd_id", "session", "trial")]
                    + [voxel_checksums(voxels)], 1)
    writer.write("train", keys, _rows(encoder(voxels.to(device), subject)))


def part_meta(branch: str, settings: dict[str, Any], encoder: dict[str, Any], num_experts: list[int],
              embed_dim: int, subject: str, num_voxels: int, part: tuple[int, int], counts: dict[str, int],
              **extra: Any) -> dict[str, Any]:
    """A part's ``meta.json``: what the reader checks (``condition_cache``) and the provenance in ``extra``."""
    return {"format_version": CONDITION_FORMAT_VERSION, "branch": branch, "encoder": encoder, **settings,
            "num_experts": list(num_experts), "embed_dim": int(embed_dim), "dtype": settings["frozen_dtype"],
            "subject": subject, "num_voxels": {subject: int(num_voxels)}, "part": list(part), "counts": counts,
            **extra}


def cache_branch(encoder: FrozenStage1, dm: NSDDataModule, out: Path, meta: dict[str, Any], shard: int,
                 num_shards: int, batch_size: int, device: str, progress: bool) -> list[Path]:
    """Write part ``shard`` of ``num_shards`` of every data subject under ``out/<subject>``; returns the parts."""
    written = []
    width = (sum(encoder.num_experts), encoder.embed_dim)
    for index, subject in enumerate(dm.subjects):
        name = f"part-{shard}-of-{num_shards}"
        final, tmp = out / subject / name, out / subject / f".{name}.tmp"
        eval_sizes = _eval_batch_sizes(dm, subject)[shard::num_shards]
        counts = {"train": _count_training_trials(dm, subject, shard, num_shards, batch_size), "eval": sum(eval_sizes)}
        subject_meta = part_meta(**meta, subject=subject, num_voxels=dm.num_voxels()[subject],
                                 part=(shard, num_shards), counts=counts, sessions=dm.sessions(subject))
        if final.is_dir() and _same(read_meta(final), subject_meta):
            written.append(final)
            continue
        writer = PartWriter(tmp, subject_meta, counts, width)
        bar = tqdm(total=sum(counts.values()), initial=sum(writer.done.values()), disable=not progress,
                   desc=f"{meta['branch']} {subject} {name}", unit="row")
        skip, batch = writer.done["train"], []
        for i, sample in enumerate(_training_trials(dm, subject, shard, num_shards, batch_size)):
            if i >= skip:
                batch.append(sample)
            if len(batch) == batch_size:
                _write_trials(writer, encoder, batch, subject, device)
                bar.update(len(batch))
                batch = []
        if batch:
            _write_trials(writer, encoder, batch, subject, device)
            bar.update(len(batch))
        rows_done = 0
        for eval_batch in _eval_batches(dm, index, shard, num_shards):
            n = int(eval_batch["valid"].sum())
            if rows_done < writer.done["eval"]:
                rows_done += n
                continue
            valid = eval_batch["valid"]
            experts = encoder(eval_batch["voxels"].to(device), subject, eval_batch["repeat_mask"].to(device))
            crc = voxel_checksums(eval_batch["voxels"][valid], eval_batch["repeat_mask"][valid])
            ids = eval_batch["nsd_id"][valid].numpy()
            keys = np.stack([ids, np.full(n, -1), np.full(n, -1), crc], 1)
            writer.write("eval", keys, _rows(experts, valid))
            rows_done += n
            bar.update(n)
        bar.close()
        writer.finish(final)
        written.append(final)
    return written


def cache_conditions(config: dict[str, Any], out: str | Path, branches: list[str] | None = None,
                     shard: int | None = None, num_shards: int | None = None, batch_size: int | None = None,
                     device: str = "cpu", progress: bool = True) -> dict[str, list[Path]]:
    """``config``: a resolved stage-2 run config (``experiments._config.load_config``). Writes ``out/<branch>``
    for each enabled branch (or those in ``branches``); returns the parts written per branch."""
    model, data = config["model"]["init_args"], dict(config["data"]["init_args"])
    enabled = [b for b in BRANCHES if model.get(f"{b}_branch") is not None]
    for b in branches or []:
        if b not in enabled:
            raise DataFormatError(f"--branches: {b!r} is not an enabled branch of this config (enabled: {enabled})")
    if shard is None or num_shards is None:
        shard, num_shards = shard_from_environment()
    if not 0 <= shard < num_shards:
        raise DataFormatError(f"--shard {shard} must be in [0, --num-shards {num_shards})")
    data.update(load_images=False, num_workers=0, targets=None, target_shapes=None)
    dm = NSDDataModule(**data)
    dm.set_rank(0, 1)
    dm.prepare_data()
    dm.setup("fit")
    written = {}
    for branch in branches or enabled:
        settings = branch_settings(model, branch)
        checkpoint = model.get(f"{branch}_encoder")
        option = f"model.{branch}_encoder"
        encoder = FrozenStage1(checkpoint, option, settings["source"], settings["prior_steps"],
                               settings["prior_guidance"], settings["prior_seed"], settings["repeat_average"])
        encoder = encoder.to(DTYPES[settings["frozen_dtype"]]).to(device)
        meta = {"branch": branch, "settings": settings, "num_experts": encoder.num_experts,
                "embed_dim": encoder.embed_dim,
                "encoder": {"path": str(Path(checkpoint).resolve()), "sha256": weights_sha256(checkpoint),
                            "target": encoder.target},
                "data": {k: data.get(k) for k in ("data_dir", "num_sessions", "val_images", "seed", "pad_repeats",
                                                  "eval_batch_size")},
                "provenance": provenance(resolved_config=config, data_format_version=FORMAT_VERSION,
                                         subjects=dm.subjects,
                                         sessions={s: dm.sessions(s) for s in dm.subjects})}
        size = batch_size or (data.get("batch_size") if isinstance(data.get("batch_size"), int) else 64)
        written[branch] = cache_branch(encoder, dm, Path(out) / branch, meta, shard, num_shards, size, device,
                                       progress)
    return written
