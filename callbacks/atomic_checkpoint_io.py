"""``AtomicCheckpointIO``: checkpoints written atomically, damaged checkpoints refused with an error naming the file.

Use as a Trainer plugin (``trainer.plugins`` in configs/base/*.yaml, or ``--trainer.plugins+=`` on the command line):

    trainer:
      plugins:
        - class_path: callbacks.atomic_checkpoint_io.AtomicCheckpointIO

Saving: ``torch.save`` into a temporary sibling (``.<name>.<pid>.tmp``, in the same directory, so on the same file
system), ``fsync``, then ``os.replace`` onto the final name, then ``fsync`` of the directory. A run killed while
saving (Slurm time limit, OOM killer, ``kill -9``) leaves the previous complete ``last.ckpt`` /
``latest-*.ckpt`` / ``hpc_ckpt_*.ckpt`` or none, never a truncated one. Lightning's own ``TorchCheckpointIO``
serialises into memory, writes into ``tempfile.mkstemp()`` (``$TMPDIR``) and ``shutil.move``s it: atomic only
when ``$TMPDIR`` is on the checkpoint's file system; otherwise it copies into place (a kill during the copy
truncates the checkpoint) and, the destination being a symlink, writes through it into the linked file.

The temporary name never contains ``ckpt_``: Lightning finds the newest ``hpc_ckpt_<n>.ckpt`` by stripping every
non-digit from the names that contain ``hpc_ckpt_`` (and numbers the next one from the names containing
``ckpt_``), so a leftover ``.hpc_ckpt_3.ckpt.4242.tmp`` would make it resume from ``hpc_ckpt_34242.ckpt``. This is
why ``datamodules.common.atomic_path`` (whose temporary is ``.<name>.<pid>.tmp``) is not used as is; the
temporaries keep its ``.*.tmp`` form, so ``remove_stale_temporaries`` finds them too. Temporaries that a killed
process left in a checkpoint directory are deleted at this process's first save into that directory.

``save_last: link`` (``last.ckpt`` a symlink to the newest checkpoint) keeps working: ``os.replace`` onto a path
that is a symlink replaces the link, it never writes into the linked file; and ``remove_checkpoint`` first points
every sibling link that still leads to the doomed file at the newest checkpoint this process saved in that
directory. ModelCheckpoint deletes its previous ``latest-*.ckpt`` *before* it re-links ``last.ckpt`` to the new one;
a run killed in between would otherwise leave ``last.ckpt`` dangling, and ``--ckpt_path last`` silently ignores
a dangling link: the run would start again from scratch.

Loading is always ``weights_only=True`` (whatever the caller asks): a file whose pickle needs more than tensors
and plain data is refused naming ``--ckpt_path``, its payload never runs. A missing file, a dangling link, an empty file, a file that is not a complete zip archive (a torch
checkpoint ends with the zip central directory, so a truncated one has none) or (``verify``, default on) one whose
stored CRC-32 does not match a member (torch itself does not check them: a flipped bit loads silently) raises
``ValueError: checkpoint <path> is corrupt or truncated (<what>): delete it or pass another --ckpt_path`` instead
of a miniz/pickle traceback. ``verify`` costs one extra read of the file (about 1-2 s per GB, mostly from the page
cache that torch.load then reuses).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.common import TMP_SUFFIX
from lightning_modules.checkpoint_files import refusal

log = logging.getLogger(__name__)

_TEMPORARY = re.compile(rf"^\..+\.(\d+){re.escape(TMP_SUFFIX)}$")


def temporary_name(final: Path) -> Path:
    """The temporary sibling of ``final`` for this process (never containing ``ckpt_``, see the module doc)."""
    return final.with_name(f".{final.name.replace('ckpt_', 'ckpt-')}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_checkpoint_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success ``fsync`` it, ``os.replace`` it onto ``final`` (a symlink
    there is replaced, not followed) and ``fsync`` the directory; on any exception delete it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_directory(final.parent)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def damage(path: str | os.PathLike, verify: bool = True) -> str | None:
    """What is wrong with the checkpoint file at ``path`` (None: a complete zip archive whose members match their
    CRC-32, or, without ``verify``, a complete zip archive)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        return f"{size} bytes without a zip central directory at the end ({exc}): cut short, or not a checkpoint"
    with archive:
        try:
            bad = archive.testzip() if verify else None
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError) as exc:
            return f"unreadable zip member ({type(exc).__name__}: {exc})"
    if bad is not None:
        return f"zip member {bad!r} does not match its CRC-32"
    return None


def describe(path: str | os.PathLike) -> str:
    """``path``, and where it links to if it is a symlink (``last.ckpt`` with ``save_last: link``)."""
    file = Path(path)
    return f"{file} (a link to {os.readlink(file)})" if file.is_symlink() else str(file)


def refuse_if_damaged(path: str | os.PathLike, verify: bool = True) -> None:
    """Raise ``ValueError: checkpoint <path> is corrupt or truncated (<what>): ...`` if ``damage`` finds anything
    (without the miniz/pickle error that led here, if any: ``<what>`` says what is wrong with the file)."""
    problem = damage(path, verify)
    if problem is not None:
        raise ValueError(f"checkpoint {describe(path)} is corrupt or truncated ({problem}): delete it or pass "
                         "another --ckpt_path") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic saves, dangling-link-free removal and a clear error for damaged files.

    Args:
        verify: check every member's CRC-32 before loading (torch.load does not); off: only truncated, empty and
            non-zip files are recognised, and only after torch.load has failed on them.
    """

    def __init__(self, verify: bool = True):
        super().__init__()
        self.verify = verify
        self._cleaned: set[Path] = set()
        self._last_saved: Path | None = None

    # ------------------------------------------------------------------ save
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            f"{type(self).__name__}")
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path)
        final = Path(path)
        self._remove_stale_temporaries(final.parent)
        with atomic_checkpoint_file(final) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        self._last_saved = final

    def _remove_stale_temporaries(self, directory: Path) -> None:
        """Once per directory: delete the temporaries that killed processes left there (other pids)."""
        key = directory.absolute()
        if key in self._cleaned:
            return
        self._cleaned.add(key)
        if not directory.is_dir():
            return
        for entry in directory.iterdir():
            match = _TEMPORARY.match(entry.name)
            if (match and int(match.group(1)) != os.getpid() and ".ckpt" in entry.name
                    and (entry.is_file() or entry.is_symlink())):
                log.info("removing %s, left by an interrupted checkpoint save", entry)
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    # ------------------------------------------------------------------ remove
    def remove_checkpoint(self, path: _PATH) -> None:
        if _is_local_file_protocol(path):
            self._repoint_links_to(Path(path))
        super().remove_checkpoint(path)

    def _repoint_links_to(self, doomed: Path) -> None:
        """Point the sibling symlinks that lead to ``doomed`` at the newest checkpoint saved in its directory."""
        newest = self._last_saved
        if newest is None or doomed.is_symlink() or not doomed.is_file():
            return
        if newest.parent.absolute() != doomed.parent.absolute():
            return
        if not newest.is_file() or newest.resolve() == doomed.resolve():
            return
        target = doomed.resolve()
        for entry in doomed.parent.iterdir():
            if entry.is_symlink() and entry.resolve() == target:
                tmp = temporary_name(entry)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                os.symlink(os.path.relpath(newest, entry.parent), tmp)
                os.replace(tmp, entry)

    # ------------------------------------------------------------------ load
    def load_checkpoint(self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        weights_only = True  # a checkpoint is data, never code: no file may run a pickle payload here
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        file = Path(path)
        if not file.exists():
            what = "is a link to a file that does not exist" if file.is_symlink() else "does not exist"
            raise FileNotFoundError(f"checkpoint {describe(file)} {what}: pass another --ckpt_path")
        if not file.is_file():
            raise ValueError(f"checkpoint {file} is not a file: pass a checkpoint file as --ckpt_path")
        if self.verify:
            refuse_if_damaged(file)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (ImportError, MemoryError):
            raise  # a missing class or too little memory is no property of the file
        except pickle.UnpicklingError as exc:
            refuse_if_damaged(file, self.verify)
            raise refusal("--ckpt_path", describe(file), exc) from None
        except Exception:
            refuse_if_damaged(file, self.verify)
            raise
