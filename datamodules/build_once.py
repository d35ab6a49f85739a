"""``build_once``: one writer among the processes, on any node, that want the same file on a shared file system.

Lightning runs ``prepare_data`` on local rank zero of every node (``prepare_data_per_node``); on a cluster whose
nodes share the cache directory they all ask for the same validation shard at the same moment. The first to create
``<file>.lock`` (exclusive create, which NFS honours too) builds the file (the builder writes it atomically) and
removes the lock; the others wait until the file exists and never rewrite a file another node may be reading.

A lock nobody alive holds is taken over: one taken on this host by a dead process, or by an earlier run of this
Slurm job (a requeue: the same job id, another restart count; the nodes of one run share both, so they wait for
each other). A lock held on another host that never goes away (a node lost mid-build outside Slurm) ends the wait
after ``timeout_s`` with an error naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datamodules.common import HOST, DataFormatError, _pid_alive, lock_record, release_lock

LOCK_SUFFIX = ".lock"
UNWRITTEN_AFTER_S = 30.0  # an empty or unreadable lock this old was left by a process that died creating it


def _restart() -> str:
    return os.environ.get("SLURM_RESTART_COUNT", "0")


def _read(lock: Path) -> tuple[str, dict[str, Any]] | None:
    """The lock's text and record ({} while unreadable); None once it is gone."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        held = json.loads(text)
    except json.JSONDecodeError:
        held = {}
    return text, held if isinstance(held, dict) else {}


def _create(lock: Path) -> int | None:
    """A descriptor of the newly created ``lock``; None when it exists already."""
    try:
        return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None


def abandoned(lock: Path, held: dict[str, Any]) -> bool:
    """Whether nobody alive holds ``lock`` (its record ``held``; see the module doc)."""
    if not held:
        with contextlib.suppress(FileNotFoundError):
            return time.time() - lock.stat().st_mtime > UNWRITTEN_AFTER_S
        return False
    job = os.environ.get("SLURM_JOB_ID")
    if job and held.get("slurm_job_id") == job and held.get("slurm_restart") != _restart():
        return True
    if held.get("host") != HOST:
        return False
    pid = held.get("pid")
    return not isinstance(pid, int) or pid == os.getpid() or not _pid_alive(pid)


def build_once(path: str | os.PathLike, build: Callable[[Path], Any], timeout_s: float = 3600.0,
               poll_s: float = 0.2) -> Path:
    """Return ``path`` once it exists, calling ``build(path)`` first in exactly one of the processes that ask for
    it at once (the holder of ``<path>.lock``); the others poll every ``poll_s`` seconds for at most
    ``timeout_s``."""
    path = Path(path)
    lock = path.with_name(path.name + LOCK_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        record = {**lock_record(), "slurm_restart": _restart()}
        fd = _create(lock)
        if fd is None:
            found = _read(lock)
            if found is None:
                continue  # released meanwhile: the file exists now, or the holder failed and we try
            text, held = found
            if abandoned(lock, held):
                with contextlib.suppress(FileNotFoundError):
                    if lock.read_text() == text:  # still the abandoned one, not a lock taken meanwhile
                        lock.unlink()
                continue
            if time.monotonic() > deadline:
                raise DataFormatError(f"waited {timeout_s:.0f} s for {path}: {lock} is held by pid "
                                      f"{held.get('pid')} on {held.get('host')} since {held.get('started')}; "
                                      "delete the lock if that run is gone")
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        try:
            if not path.exists():  # the previous holder may have finished between our check and our lock
                build(path)
        finally:
            release_lock(lock, record)
    return path
