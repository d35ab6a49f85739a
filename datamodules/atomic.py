"""Atomic file output: write to a temporary sibling, then rename, so nothing half-written is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from datamodules.errors import DataFormatError

TMP_SUFFIX = ".tmp"
HOST = socket.gethostname().replace(os.sep, "_") or "localhost"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    On any exception the temporary file is removed, so a reader never sees a partial ``path``.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{HOST}.{os.getpid()}{TMP_SUFFIX}")  # unique across nodes and ranks
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporaries left by an interrupted run below ``directory``; return what was removed.

    Only safe while holding the directory's ``output_lock`` (no other live run writes there)."""
    removed = []
    root = Path(directory)
    if root.exists():
        for tmp in root.rglob(f".*{TMP_SUFFIX}"):
            tmp.unlink()
            removed.append(tmp)
    return removed


def writable_dir(directory: str | os.PathLike) -> bool:
    """Whether files can be created in ``directory`` (created if missing), by a real attempt: permission bits do
    not say it (root ignores them; a read-only mount or a cluster's shared dataset does not show in them)."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=f".write-probe.{socket.gethostname()}.{os.getpid()}."):
            pass
    except OSError:
        return False
    return True


class OutputLockedError(DataFormatError):
    """Another live run holds the output directory's lock file; the message names the file, pid and host."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_record() -> dict[str, Any]:
    """Who holds a lock: pid, host, Slurm job (a requeued job takes its own lock over on any node), command."""
    import sys
    import time

    return {"pid": os.getpid(), "host": HOST, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}


def _stale(record: Mapping[str, Any]) -> bool:
    """A lock nobody alive holds: taken on this host by a dead pid (or by this very process), or by this Slurm job
    before it was requeued. A lock of a live pid on another host cannot be checked and is respected."""
    if record.get("slurm_job_id") and record.get("slurm_job_id") == os.environ.get("SLURM_JOB_ID") \
            and record.get("pid") != os.getpid():
        return True
    if record.get("host") != HOST:
        return False
    pid = record.get("pid")
    return not isinstance(pid, int) or pid == os.getpid() or not _pid_alive(pid)


def acquire_lock(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Create the lock file ``path`` (exclusive create) and return its record; a stale lock (``_stale``) is taken
    over; a live one raises ``OutputLockedError``: "another <what> is writing here (pid, host)"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = lock_record()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = path.read_text()
                held = json.loads(text)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                held, text = {}, None  # half-written by a process that died while creating it
            if held and not _stale(held):
                raise OutputLockedError(
                    f"another {what} is writing here (pid {held.get('pid')}, host {held.get('host')}, since "
                    f"{held.get('started')}): {path}; wait for it, or delete that file if that run is gone") from None
            with contextlib.suppress(FileNotFoundError):
                if text is None or path.read_text() == text:  # still the stale one (not a lock taken meanwhile)
                    path.unlink()
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        return record
    raise OutputLockedError(f"cannot take the lock {path} of this {what}: other runs keep taking it")


def release_lock(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Remove the lock file ``path`` if it is still the one ``record`` took."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, OSError):
        if json.loads(path.read_text()) == dict(record):
            path.unlink()


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, what: str = "import", name: str = ".lock") -> Iterator[Path]:
    """Hold ``directory/name`` while the block runs (``acquire_lock``); released however the block ends."""
    path = Path(directory) / name
    record = acquire_lock(path, what)
    try:
        yield path
    finally:
        release_lock(path, record)
