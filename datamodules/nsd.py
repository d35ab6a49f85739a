"""``NSDDataModule``: the one data module of both stages, over our WebDataset shards (``datamodules/README.md``).

Training batches: ``{"subj01": sub_batch, ...}`` from a ``CombinedLoader`` of per-subject loaders, each
sub-batch ``voxels`` (b_s, V_s), ``image`` (b_s, 3, H, W) in [0, 1], ``nsd_id`` (b_s,), ``captions``,
``categories``, joined targets, plus diagnostics ``worker``/``epoch``. Validation and test: one loader per
subject (``dataloader_idx`` = position in ``subjects``), batches with ``voxels`` (b, R, V), ``repeat_mask`` (b, R)
and ``valid`` (b,) (False on DDP padding copies).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from datamodules.common import DataFormatError, writable_dir
from datamodules.shard_format import decode_sample, load_subject_meta, read_tar_members, subject_name
from datamodules.streams import EvalStream, TrainStream, epoch_pass_batches
from datamodules.target_cache import TargetCache
from datamodules.val_split import build_val_shard, choose_val_ids, source_fingerprint, val_cache_path


def _check_numbers(**checks: tuple[Any, int, bool]) -> None:
    """``name=(value, minimum, may_be_none)``: each must be an integer >= minimum (a negative batch size would
    never yield a batch, zero divides by zero): one line naming the option otherwise."""
    for name, (value, minimum, may_be_none) in checks.items():
        if value is None and may_be_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DataFormatError(f"data.{name} must be an integer >= {minimum}"
                                  f"{' (or null)' if may_be_none else ''}, got {value!r}")


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "morebrain"


class EpochLoader(DataLoader):
    """A ``DataLoader`` over a ``TrainStream`` that tells the stream (and its workers) the epoch, and how many of
    the epoch's batches a resumed run has already trained (``resume_fn``; the stream skips them), at the first
    ``next`` of each iteration.

    Not at ``iter``: Lightning creates a resumed run's training iterator before it finishes restoring its epoch
    counters (resuming from a checkpoint written at the end of epoch e, ``iter`` still sees ``current_epoch == e``
    and the trainer then runs epoch e + 1), and it does not prefetch from loaders with a length, so the first
    ``next`` comes from the training loop with the counters final.
    """

    def __init__(self, dataset: TrainStream, epoch_fn: Callable[[], int | None],
                 resume_fn: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.epoch_fn, self.resume_fn = epoch_fn, resume_fn
        self.iterations = 0

    def __iter__(self):
        return _DeferredIterator(self._start)

    def _start(self):
        epoch = self.epoch_fn()
        self.dataset.epoch.value = self.iterations if epoch is None else int(epoch)
        self.dataset.resume_from.value = int(self.resume_fn()) if self.resume_fn is not None else 0
        self.iterations += 1
        return super().__iter__()


class _DeferredIterator:
    """Calls ``start`` (which returns the real iterator) at the first ``next``."""

    def __init__(self, start: Callable[[], Any]):
        self._start, self._iterator = start, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)

    def __getstate__(self) -> dict[str, Any]:  # like Lightning's loader iterators: a started iterator is not copied
        return {**self.__dict__, "_iterator": None}


class NSDDataModule(L.LightningDataModule):
    """NSD (or synthetic NSD) shards -> per-subject batches, with DDP-exact epoch lengths.

    Args:
        data_dir: prepared dataset root (``ROOT/subjXX/meta.json``).
        subjects: subject names or numbers; training batches hold one sub-batch per subject.
        num_sessions: use the first N training sessions of each subject (default all).
        batch_size: per-rank batch size, one int or ``{subject: int}``.
        eval_batch_size: per-rank validation/test batch size.
        num_workers: loader workers per subject loader.
        samples_per_epoch: training samples per epoch over all subjects and ranks (default: the number of
            training trials, i.e. about one pass); steps per epoch = samples_per_epoch // global batch.
        train_sampling: ``resampled`` (default: shards drawn with replacement, fixed epoch length, no I/O overhead)
            or ``epoch`` (an exact pass: every training trial at most once per epoch, equal batch counts on every
            rank, each loader worker scanning the subject's shards; ``samples_per_epoch`` is then ignored and every
            subject yields the batches of the subject with the fewest).
        val_images: whole training images per subject held out for validation (0: no validation).
        seed: seeds the validation choice, shard resampling and shuffling (mixed with subject, rank, worker, epoch).
        shuffle_buffer / shuffle_initial: sample shuffle buffer of the training stream.
        pad_repeats: ``zeros`` (mask marks real repeats) or ``duplicate`` (MindEyeV2's padding).
        load_images: decode images (stages that use cached targets only can turn this off).
        targets: ``{name: directory}`` target caches joined by nsd_id (relative paths are below ``data_dir``).
        target_shapes: ``{name: shape}`` expected per-item shapes; a cache of another shape is refused.
        val_cache_dir: where validation shards are materialised (default ``data_dir/val_cache``, or, when
            ``data_dir`` is read-only, e.g. a shared dataset on a cluster, ``<trainer.default_root_dir>/val_cache``
            with a Trainer and ``$XDG_CACHE_HOME/morebrain/val_cache`` without one). A shard is named by a hash of
            the validation choice and of the session shards it is built from (sizes, modification times), so
            re-imported data is never validated against a cache of the old voxels.
        predict_split: the split ``predict`` iterates (``test`` or ``val``).
    """

    def __init__(self, data_dir: str, subjects: list[str] | None = None, num_sessions: int | None = None,
                 batch_size: int | dict[str, int] = 24, eval_batch_size: int = 50, num_workers: int = 2,
                 samples_per_epoch: int | None = None, val_images: int = 300, seed: int = 0,
                 shuffle_buffer: int = 1000, shuffle_initial: int = 100,
                 pad_repeats: Literal["zeros", "duplicate"] = "zeros", load_images: bool = True,
                 targets: dict[str, str] | None = None, target_shapes: dict[str, list[int]] | None = None,
                 val_cache_dir: str | None = None, persistent_workers: bool = False, pin_memory: bool = False,
                 predict_split: Literal["test", "val"] = "test",
                 train_sampling: Literal["resampled", "epoch"] = "resampled"):
        super().__init__()
        self.save_hyperparameters()
        _check_numbers(num_sessions=(num_sessions, 1, True), eval_batch_size=(eval_batch_size, 1, False),
                       num_workers=(num_workers, 0, False), samples_per_epoch=(samples_per_epoch, 1, True),
                       val_images=(val_images, 0, False), seed=(seed, 0, False),
                       shuffle_buffer=(shuffle_buffer, 1, False), shuffle_initial=(shuffle_initial, 0, False))
        _check_numbers(**{f"batch_size[{k}]" if isinstance(batch_size, dict) else "batch_size": (v, 1, False)
                          for k, v in (batch_size.items() if isinstance(batch_size, dict) else [("", batch_size)])})
        self.data_dir = Path(data_dir)
        self.subjects = [subject_name(s) for s in (subjects or ["subj01"])]
        if len(set(self.subjects)) != len(self.subjects):
            raise DataFormatError(f"data.subjects lists a subject twice: {self.subjects}")
        if pad_repeats not in ("zeros", "duplicate"):
            raise DataFormatError(f"data.pad_repeats must be 'zeros' or 'duplicate', got {pad_repeats!r}")
        if isinstance(batch_size, dict):
            sizes = {subject_name(k): int(v) for k, v in batch_size.items()}
            missing = [s for s in self.subjects if s not in sizes]
            if missing:
                raise DataFormatError(f"data.batch_size has no entry for {missing}")
            self.batch_sizes = {s: sizes[s] for s in self.subjects}
        else:
            self.batch_sizes = {s: int(batch_size) for s in self.subjects}
        self.num_sessions, self.eval_batch_size, self.num_workers = num_sessions, eval_batch_size, num_workers
        self.samples_per_epoch, self.val_images, self.seed = samples_per_epoch, val_images, seed
        self.shuffle_buffer, self.shuffle_initial, self.pad_repeats = shuffle_buffer, shuffle_initial, pad_repeats
        self.load_images, self.persistent_workers, self.pin_memory = load_images, persistent_workers, pin_memory
        self.target_dirs = {k: Path(v) if Path(v).is_absolute() else self.data_dir / v
                            for k, v in (targets or {}).items()}
        self.target_shapes = target_shapes or {}
        unknown = set(self.target_shapes) - set(self.target_dirs)
        if unknown:
            raise DataFormatError(f"data.target_shapes names {sorted(unknown)}, which data.targets lacks")
        self.val_cache_dir = Path(val_cache_dir) if val_cache_dir else self.data_dir / "val_cache"
        self._val_cache_given = val_cache_dir is not None
        self.predict_split = predict_split
        if train_sampling not in ("resampled", "epoch"):
            raise DataFormatError(f"data.train_sampling must be 'resampled' or 'epoch', got {train_sampling!r}")
        self.train_sampling = train_sampling
        self.metas: dict[str, dict[str, Any]] = {}
        self._val_ids: dict[str, list[int]] = {}
        self._train_trials: dict[str, int] = {}
        self._manual_rank: tuple[int, int] | None = None

    # ---------------------------------------------------------------- metadata
    def _load_metas(self) -> None:
        if self.metas:
            return
        for s in self.subjects:
            meta = load_subject_meta(self.data_dir, s)
            available = [x["session"] for x in meta["sessions"]]
            if self.num_sessions is not None and not 1 <= self.num_sessions <= len(available):
                raise DataFormatError(f"data.num_sessions={self.num_sessions} but {s} has {len(available)} "
                                      f"prepared sessions under {self.data_dir / s}")
            self.metas[s] = meta

    def sessions(self, subject: str) -> list[int]:
        """The training sessions used for ``subject``: the first ``num_sessions`` (chronological)."""
        self._load_metas()
        chosen = sorted(x["session"] for x in self.metas[subject]["sessions"])
        return chosen[: self.num_sessions] if self.num_sessions else chosen

    def val_ids(self, subject: str) -> list[int]:
        """The held-out validation images of ``subject`` (sorted nsd_id), chosen once."""
        if subject not in self._val_ids:
            self._load_metas()
            self._val_ids[subject] = choose_val_ids(self.metas[subject], self.sessions(subject), self.val_images,
                                                    self.seed)
        return self._val_ids[subject]

    def num_voxels(self) -> dict[str, int]:
        """Voxel count per subject (what the stage-1 adapters are built with)."""
        self._load_metas()
        return {s: int(self.metas[s]["num_voxels"]) for s in self.subjects}

    def train_trials(self, subject: str) -> int:
        """Training trials of ``subject`` in the selected sessions, validation images excluded."""
        if subject not in self._train_trials:
            excluded, sessions = set(self.val_ids(subject)), set(self.sessions(subject))
            self._train_trials[subject] = sum(1 for x in self.metas[subject]["sessions"] if x["session"] in sessions
                                              for i in x["nsd_ids"] if i not in excluded)
        return self._train_trials[subject]

    # ---------------------------------------------------------------- rank / epoch bookkeeping
    def set_rank(self, rank: int, world_size: int) -> None:
        """Pin the rank and world size (for use without a Trainer, e.g. in analyses and tests)."""
        self._manual_rank = (rank, world_size)

    def rank_and_world(self) -> tuple[int, int]:
        if self._manual_rank is not None:
            return self._manual_rank
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def _current_epoch(self) -> int | None:
        """The trainer's epoch (so a resumed run continues the seed sequence); None without a trainer."""
        return self.trainer.current_epoch if self.trainer is not None else None

    def _batches_done(self) -> int:
        """Training batches of the current epoch the trainer has already run: 0 at the start of an epoch, the
        restored count when a run resumes mid-epoch (the streams skip them, so the epoch goes on where it stopped
        instead of replaying its first batches); 0 without a trainer."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def num_train_batches(self) -> int:
        """Training batches per epoch on every rank = samples_per_epoch // (sum of batch sizes * world size);
        with ``train_sampling: epoch`` the exact-pass count of the subject with the fewest batches."""
        _, world = self.rank_and_world()
        if self.train_sampling == "epoch":
            return min(epoch_pass_batches(self.train_trials(s), world, max(self.num_workers, 1),
                                          self.batch_sizes[s])[0] for s in self.subjects)
        samples = self.samples_per_epoch or sum(self.train_trials(s) for s in self.subjects)
        return max(1, samples // (sum(self.batch_sizes.values()) * world))

    # ---------------------------------------------------------------- Lightning hooks
    def _val_cache_dirs(self) -> list[Path]:
        """Where validation shards are looked for, in order: ``data.val_cache_dir`` when set; else
        ``data_dir/val_cache`` and the fallback used when ``data_dir`` is read-only (the run's root directory
        with a Trainer, the user cache directory without)."""
        if self._val_cache_given:
            return [self.val_cache_dir]
        fallback = (Path(self.trainer.default_root_dir) if self.trainer is not None else _user_cache_dir())
        return [self.val_cache_dir, fallback / "val_cache"]

    def _val_cache_file(self, s: str, build: bool = False) -> Path:
        """The validation shard of ``s``: the first that exists among ``_val_cache_dirs``; with ``build``, else
        where it is to be written (the first writable directory; none is one line naming them)."""
        ids, sessions = self.val_ids(s), self.sessions(s)
        fingerprint = source_fingerprint(self.data_dir / s, self.metas[s], sessions)
        paths = [val_cache_path(d, s, sessions, ids, fingerprint) for d in self._val_cache_dirs()]
        found = next((p for p in paths if p.exists()), None)
        if found is not None or not build:
            return found or paths[0]
        target = next((p for p in paths if writable_dir(p.parent)), None)
        if target is None:
            raise DataFormatError(f"cannot write the validation shard of {s}: "
                                  f"{' and '.join(str(p.parent) for p in paths)} are not writable "
                                  "(set data.val_cache_dir to a writable directory)")
        return target

    def prepare_data(self) -> None:
        """Validate metadata, and materialise validation shards once (rank zero of each node; of nodes sharing
        the cache directory one writes, the others wait)."""
        self._load_metas()
        for s in self.subjects:
            ids = self.val_ids(s)
            if ids:
                build_val_shard(self.data_dir / s, self.metas[s], self.sessions(s), ids,
                                self._val_cache_file(s, build=True))

    def setup(self, stage: str | None = None) -> None:
        self._load_metas()
        self.targets = {name: TargetCache(d, self.target_shapes.get(name)) for name, d in self.target_dirs.items()}
        for s in self.subjects:
            sessions = set(self.sessions(s))
            listed = [x["shard"] for x in self.metas[s]["sessions"] if x["session"] in sessions]
            listed += [x["shard"] for x in self.metas[s]["test"]["shards"]]
            missing = [self.data_dir / s / name for name in listed if not (self.data_dir / s / name).is_file()]
            if missing:
                raise DataFormatError(f"shard {missing[0]} is missing (listed in {self.data_dir / s / 'meta.json'}"
                                      f"{f'; {len(missing) - 1} more' if len(missing) > 1 else ''})")
            if self.train_trials(s) == 0:
                raise DataFormatError(f"{s}: no training trials left in sessions {self.sessions(s)}")

    def _train_stream(self, s: str, index: int) -> TrainStream:
        rank, world = self.rank_and_world()
        meta = self.metas[s]
        sessions = set(self.sessions(s))
        shards = [str(self.data_dir / s / x["shard"]) for x in meta["sessions"] if x["session"] in sessions]
        return TrainStream(shards, subject=s, batch_size=self.batch_sizes[s], num_batches=self.num_train_batches(),
                           rank=rank, seed=self.seed + 1000 * index, exclude_ids=self.val_ids(s),
                           shuffle_buffer=self.shuffle_buffer, shuffle_initial=self.shuffle_initial,
                           load_images=self.load_images, targets=self.targets, sampling=self.train_sampling,
                           world_size=world, num_samples=self.train_trials(s), num_workers=self.num_workers,
                           max_batches=self.num_train_batches(),  # epoch pass: as many as the subject with fewest
                           num_voxels=int(meta["num_voxels"]))

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.persistent_workers and self.num_workers > 0}

    def train_dataloader(self) -> CombinedLoader:
        loaders = {s: EpochLoader(self._train_stream(s, i), self._current_epoch, self._batches_done,
                                  **self._loader_kwargs())
                   for i, s in enumerate(self.subjects)}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _eval_loader(self, s: str, shards: list[tuple[str, list[int]]]) -> DataLoader:
        rank, world = self.rank_and_world()
        stream = EvalStream(shards, subject=s, batch_size=self.eval_batch_size, rank=rank, world_size=world,
                            max_repeats=int(self.metas[s]["max_repeats"]), pad_repeats=self.pad_repeats,
                            load_images=self.load_images, targets=self.targets,
                            num_voxels=int(self.metas[s]["num_voxels"]))
        return DataLoader(stream, batch_size=None, **self._loader_kwargs())

    def _val_shards(self, s: str) -> list[tuple[str, list[int]]]:
        ids = self.val_ids(s)
        path = self._val_cache_file(s)
        if not path.exists():
            raise DataFormatError(f"validation shard {path} is missing: prepare_data() has not run "
                                  "(Lightning calls it; call it yourself outside a Trainer)")
        return [(str(path), ids)]

    def _test_shards(self, s: str) -> list[tuple[str, list[int]]]:
        return [(str(self.data_dir / s / x["shard"]), x["nsd_ids"]) for x in self.metas[s]["test"]["shards"]]

    def validation_images(self, subject: str, ids: set[int] | None = None) -> dict[int, Any]:
        """(H, W, 3) uint8 image of each validation image (or of ``ids`` among them) of ``subject``, read from its
        materialised validation shard (callbacks draw retrieval galleries from it)."""
        path, _ = self._val_shards(subject_name(subject))[0]
        grouped: dict[str, dict[str, bytes]] = {}
        for name, payload in read_tar_members(path).items():
            key, _, ext = name.partition(".")
            grouped.setdefault(key, {"__key__": key})[ext] = payload
        images = {}
        for raw in grouped.values():
            sample = decode_sample(raw, True)
            nsd_id = int(sample["info"]["nsd_id"])
            if ids is None or nsd_id in ids:
                images[nsd_id] = sample["image"]
        return images

    def val_dataloader(self) -> list[DataLoader]:
        if not self.val_images:
            return []
        return [self._eval_loader(s, self._val_shards(s)) for s in self.subjects]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s, self._test_shards(s)) for s in self.subjects]

    def predict_dataloader(self) -> list[DataLoader]:
        split = self._val_shards if self.predict_split == "val" else self._test_shards
        return [self._eval_loader(s, split(s)) for s in self.subjects]
