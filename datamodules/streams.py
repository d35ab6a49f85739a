"""Iterable datasets that produce ready batches for one subject on one rank (loaders use ``batch_size=None``).

``TrainStream``: by default (``sampling="resampled"``) shards are resampled with replacement from a seeded RNG that
differs across subjects, ranks, workers and epochs; a seeded shuffle buffer; exactly ``num_batches`` batches per
rank split across workers, so every rank yields the same count for any number of shards (one session on 2 ranks x
2 workers included). ``sampling="epoch"`` is an exact pass instead: see ``epoch_pass_batches``.

``EvalStream``: a fixed list of samples in ascending ``nsd_id``, split into equal contiguous blocks per rank
(padded with copies flagged ``valid = False``), batched, batches dealt to workers round-robin so that the loader
returns them in order.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.common import DataFormatError
from datamodules.shard_format import INFO_KEY, decode_sample
from datamodules.target_cache import TargetCache


def stream_seed(*parts: int | str) -> int:
    """A stable 32-bit seed from any mix of ints and strings (same on every machine and run)."""
    return zlib.crc32(json.dumps([str(p) for p in parts]).encode())


def raise_with_shard(exc: Exception) -> bool:
    """webdataset handler: re-raise read errors as ``DataFormatError`` naming the shard (a missing one as such)."""
    if isinstance(exc, DataFormatError):
        raise exc
    missing = next((e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, FileNotFoundError)), None)
    if missing is not None:
        raise DataFormatError(f"shard {missing.filename or exc} is missing") from exc
    raise DataFormatError(f"cannot read shard sample: {exc} (truncated or corrupt shard?)") from exc


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _nsd_id(raw: Mapping[str, Any]) -> int:
    return int(json.loads(raw[INFO_KEY])["nsd_id"])


def collate(samples: Sequence[dict[str, Any]], subject: str, targets: Mapping[str, TargetCache],
            num_voxels: int | None = None) -> dict[str, Any]:
    """Decoded samples -> sub-batch dict: ``voxels`` (b, V) or (b, R, V) float32, ``image`` (b, 3, H, W) in [0, 1],
    ``nsd_id`` (b,), ``captions``/``categories`` (lists of lists), ``subject``, one tensor per target, and for
    training trials ``session``/``trial`` (b,)."""
    ids = np.array([s["info"]["nsd_id"] for s in samples], dtype=np.int64)
    expected = num_voxels if num_voxels is not None else samples[0]["voxels"].shape[-1]
    odd = next((s for s in samples if s["voxels"].shape[-1] != expected), None)
    if odd is not None:  # e.g. one session shard written from other betas: name it and both counts
        where = "its meta.json says" if num_voxels is not None else \
            f"other samples of the batch (from {samples[0].get('url')}) have"
        raise DataFormatError(f"{subject}: shard {odd.get('url')} (key {odd.get('key')}) has "
                              f"{odd['voxels'].shape[-1]} voxels, {where} {expected}")
    batch: dict[str, Any] = {
        "subject": subject,
        "voxels": torch.from_numpy(np.stack([s["voxels"] for s in samples]).astype(np.float32)),
        "nsd_id": torch.from_numpy(ids),
        "captions": [list(s["info"].get("captions", [])) for s in samples],
        "categories": [list(s["info"].get("categories", [])) for s in samples],
    }
    if "session" in samples[0]["info"]:  # training trials: which scan session and trial each row is
        batch["session"] = torch.tensor([s["info"]["session"] for s in samples])
        batch["trial"] = torch.tensor([s["info"]["trial"] for s in samples])
    if samples[0]["image"] is not None:
        images = np.stack([s["image"] for s in samples])
        batch["image"] = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    for name, cache in targets.items():
        batch[name] = torch.from_numpy(np.array(cache.lookup(ids), dtype=np.float32))
    return batch


def epoch_pass_batches(num_samples: int, world_size: int, num_workers: int, batch_size: int,
                       ) -> tuple[int, list[list[int]]]:
    """Exact-pass epoch: sample g of the epoch's stream goes to rank ``g % world`` and, within it, to worker
    ``(g // world) % workers``. Returns the batches per rank (equal on all ranks: the smallest rank's full batches)
    and, per rank, how many of them each worker yields. Depends on counts only, so it is fixed across epochs."""
    def share(n: int, parts: int, index: int) -> int:
        return len(range(index, n, parts))

    full = [[share(share(num_samples, world_size, r), num_workers, w) // batch_size for w in range(num_workers)]
            for r in range(world_size)]
    total = min(sum(f) for f in full)
    return total, [deal_batches(per_worker, total) for per_worker in full]


def loader_order(counts: Sequence[int]) -> list[int]:
    """The worker of each batch a ``DataLoader`` returns, given the batches each worker yields: it takes them from
    its workers in turn, in worker order, passing over workers that are done."""
    order, taken = [], [0] * len(counts)
    while len(order) < sum(counts):
        for w, c in enumerate(counts):
            if taken[w] < c:
                order.append(w)
                taken[w] += 1
    return order


def resume_roles(counts: Sequence[int], done: int) -> list[tuple[int, int]]:
    """For a loader restarted after the first ``done`` batches of an epoch: per worker, the worker of the
    uninterrupted loader whose batches it continues (its role) and how many of them to skip, such that the new
    loader returns exactly batches ``done, done + 1, ...`` of the uninterrupted order. Roles rotate: the new
    loader starts at worker 0, the uninterrupted one would have gone on with the worker of batch ``done``."""
    order = loader_order(counts)
    skipped = [order[:done].count(w) for w in range(len(counts))]
    start = order[done] if done < len(order) else 0
    cyclic = [(start + k) % len(counts) for k in range(len(counts))]
    roles = [w for w in cyclic if skipped[w] < counts[w]] + [w for w in cyclic if skipped[w] >= counts[w]]
    return [(role, skipped[role]) for role in roles]


def deal_batches(available: list[int], total: int) -> list[int]:
    """Per-worker batch counts, in worker order, that sum to ``total`` without exceeding ``available``."""
    deal, left = [], total
    for n in available:
        deal.append(min(n, left))
        left -= deal[-1]
    return deal


class TrainStream(IterableDataset):
    """Training batches of one subject for one rank: ``num_batches`` per epoch over all workers.

    ``sampling="resampled"``: shards drawn with replacement, per (seed, subject, rank, worker, epoch).
    ``sampling="epoch"``: every rank and worker scans all shards in an epoch-seeded shard order shared by all ranks
    and keeps its own round-robin share of the samples (``epoch_pass_batches``), so each sample is seen at most
    once per epoch (the tail that does not fill a batch on every rank is dropped) at the cost of every worker
    reading the subject's shards (decoding only its share). ``max_batches`` caps an epoch-pass epoch (so that
    several subjects yield the same count).
    """

    def __init__(self, shards: Sequence[str], *, subject: str, batch_size: int, num_batches: int, rank: int,
                 seed: int, exclude_ids: Sequence[int] = (), shuffle_buffer: int = 1000, shuffle_initial: int = 100,
                 load_images: bool = True, targets: Mapping[str, TargetCache] | None = None,
                 sampling: str = "resampled", world_size: int = 1, num_samples: int = 0, num_workers: int = 1,
                 max_batches: int | None = None, num_voxels: int | None = None):
        if not shards:
            raise DataFormatError(f"{subject}: no training shards selected")
        if sampling not in ("resampled", "epoch"):
            raise DataFormatError(f"data.train_sampling must be 'resampled' or 'epoch', got {sampling!r}")
        self.shards, self.subject, self.batch_size = list(shards), subject, batch_size
        self.sampling, self.world_size, self.num_samples = sampling, world_size, num_samples
        if sampling == "epoch":
            num_batches, self.deals = epoch_pass_batches(num_samples, world_size, max(num_workers, 1), batch_size)
            if max_batches is not None and max_batches < num_batches:  # e.g. the subject with the fewest batches
                num_batches = max_batches
                self.deals = [deal_batches(deal, num_batches) for deal in self.deals]
            if num_batches == 0:
                raise DataFormatError(f"{subject}: {num_samples} training samples are too few for a full batch of "
                                      f"{batch_size} on each of {world_size} ranks x {num_workers} workers")
        self.num_batches, self.rank, self.seed = num_batches, rank, seed
        self.exclude_ids = frozenset(int(i) for i in exclude_ids)
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.load_images, self.targets = load_images, dict(targets or {})
        self.num_voxels = num_voxels  # the subject's voxel count (meta.json): a sample of another is refused
        self.epoch = mp.Value("i", 0)  # shared with loader workers; set by EpochLoader before each epoch
        # batches of this epoch that a resumed run trained before it was interrupted (set by EpochLoader): they are
        # drawn as before, so the rest of the epoch is what the uninterrupted run got, but not decoded or yielded
        self.resume_from = mp.Value("i", 0)

    def __len__(self) -> int:
        return self.num_batches

    def batches_for_worker(self, worker: int, num_workers: int) -> int:
        if self.sampling == "epoch":
            if len(self.deals[self.rank]) != num_workers:
                raise DataFormatError(f"{self.subject}: the loader has {num_workers} workers, the stream was "
                                      f"planned for {len(self.deals[self.rank])}")
            return self.deals[self.rank][worker]
        return self.num_batches // num_workers + (1 if worker < self.num_batches % num_workers else 0)

    def _urls(self, rng: random.Random) -> Iterator[dict[str, str]]:
        while True:
            yield {"url": rng.choice(self.shards)}

    def _epoch_pass(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        order = list(self.shards)
        random.Random(stream_seed("pass", self.seed, self.subject, epoch)).shuffle(order)
        raw = wds.tarfile_to_samples(handler=raise_with_shard)({"url": u} for u in order)
        index = 0
        for sample in raw:
            if self.exclude_ids and _nsd_id(sample) in self.exclude_ids:
                continue
            if index % self.world_size == self.rank and (index // self.world_size) % num_workers == worker:
                yield sample
            index += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        epoch = self.epoch.value
        role, skip = worker, 0  # role: whose share of the epoch this worker produces (another after a resume)
        if self.resume_from.value:
            counts = [self.batches_for_worker(w, num_workers) for w in range(num_workers)]
            role, skip = resume_roles(counts, self.resume_from.value)[worker]
        n_batches = self.batches_for_worker(role, num_workers)
        if n_batches - skip <= 0:
            return
        shuffle_rng = random.Random(stream_seed("shuffle", self.seed, self.subject, self.rank, role, epoch))
        if self.sampling == "epoch":
            raw = self._epoch_pass(epoch, role, num_workers)
        else:
            shard_rng = random.Random(stream_seed("shards", self.seed, self.subject, self.rank, role, epoch))
            raw = wds.tarfile_to_samples(handler=raise_with_shard)(self._urls(shard_rng))
            if self.exclude_ids:
                raw = (s for s in raw if _nsd_id(s) not in self.exclude_ids)
        raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_initial, rng=shuffle_rng)(raw)
        pending: list[dict[str, Any]] = []
        emitted = skipped_rows = 0
        for sample in raw:
            if emitted < skip:  # already trained on before the run was resumed: drawn, not decoded
                skipped_rows += 1
                if skipped_rows == self.batch_size:
                    skipped_rows, emitted = 0, emitted + 1
                continue
            pending.append(decode_sample(sample, self.load_images))
            if len(pending) == self.batch_size:
                batch = collate(pending, self.subject, self.targets, self.num_voxels)
                batch.update(worker=worker, epoch=epoch)
                yield batch
                pending, emitted = [], emitted + 1
                if emitted == n_batches:
                    return


def _pad_repeats(voxels: np.ndarray, max_repeats: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(r, V) -> (R, V) and mask (R,). ``zeros``: pad with zeros, mask marks real repeats. ``duplicate``:
    MindEyeV2's padding (1 repeat -> x3; 2 -> the first again), every row counted."""
    r = len(voxels)
    if r > max_repeats:
        voxels, r = voxels[:max_repeats], max_repeats
    out = np.zeros((max_repeats, voxels.shape[1]), voxels.dtype)
    mask = np.zeros(max_repeats, bool)
    if mode == "duplicate":
        order = (list(range(r)) + [0] * max_repeats)[:max_repeats] if r > 1 else [0] * max_repeats
        return voxels[order], np.ones(max_repeats, bool)
    out[:r], mask[:r] = voxels, True
    return out, mask


class EvalStream(IterableDataset):
    """Fixed, ordered evaluation batches (one sample per image, all repeats) for one rank."""

    def __init__(self, shards: Sequence[tuple[str, Sequence[int]]], *, subject: str, batch_size: int, rank: int,
                 world_size: int, max_repeats: int = 3, pad_repeats: str = "zeros", load_images: bool = True,
                 targets: Mapping[str, TargetCache] | None = None, num_voxels: int | None = None):
        self.num_voxels = num_voxels  # the subject's voxel count (meta.json): a sample of another is refused
        if pad_repeats not in ("zeros", "duplicate"):
            raise DataFormatError(f"pad_repeats must be 'zeros' or 'duplicate', got {pad_repeats!r}")
        self.shards = [(url, [int(i) for i in ids]) for url, ids in shards]
        self.order = [i for _, ids in self.shards for i in ids]
        if not self.order:
            raise DataFormatError(f"{subject}: the evaluation set is empty")
        if sorted(set(self.order)) != self.order:
            raise DataFormatError(f"{subject}: evaluation shards must list unique nsd_id in ascending order")
        self.subject, self.batch_size, self.rank, self.world_size = subject, batch_size, rank, world_size
        self.max_repeats, self.pad_repeats = max_repeats, pad_repeats
        self.load_images, self.targets = load_images, dict(targets or {})
        per_rank = -(-len(self.order) // world_size)
        start = min(rank * per_rank, len(self.order))
        own = list(range(start, min(start + per_rank, len(self.order))))
        self.positions = own + [own[-1] if own else len(self.order) - 1] * (per_rank - len(own))
        self.valid = [True] * len(own) + [False] * (per_rank - len(own))

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        batches = [(list(self.positions[j * self.batch_size:(j + 1) * self.batch_size]),
                    self.valid[j * self.batch_size:(j + 1) * self.batch_size])
                   for j in range(worker, len(self), num_workers)]
        if not batches:
            return
        wanted = {self.order[p] for pos, _ in batches for p in pos}
        pending = list(batches)
        decoded: dict[int, dict[str, Any]] = {}
        for url, ids in self.shards:
            if not wanted.intersection(ids):
                continue
            for raw in wds.tarfile_to_samples(handler=raise_with_shard)([{"url": url}]):
                nsd_id = _nsd_id(raw)
                if nsd_id not in wanted:
                    continue
                sample = decode_sample(raw, self.load_images)
                sample["voxels"], sample["repeat_mask"] = _pad_repeats(
                    np.atleast_2d(sample["voxels"]), self.max_repeats, self.pad_repeats)
                decoded[nsd_id] = sample
                while pending and all(self.order[p] in decoded for p in pending[0][0]):
                    yield self._collate(*pending.pop(0), decoded)
                    still_needed = {self.order[p] for pos, _ in pending for p in pos}
                    decoded = {k: v for k, v in decoded.items() if k in still_needed}
                    if not pending:
                        return
        if pending:
            missing = sorted({self.order[p] for pos, _ in pending for p in pos} - set(decoded))[:5]
            raise DataFormatError(f"{self.subject}: nsd_id {missing} listed in meta.json not found in its shards")

    def _collate(self, positions: list[int], valid: list[bool], decoded: dict[int, dict]) -> dict[str, Any]:
        samples = [decoded[self.order[p]] for p in positions]
        batch = collate(samples, self.subject, self.targets, self.num_voxels)
        batch["repeat_mask"] = torch.from_numpy(np.stack([s["repeat_mask"] for s in samples]))
        batch["valid"] = torch.tensor(valid, dtype=torch.bool)
        return batch
