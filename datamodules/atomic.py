"""Atomic file output: write to a temporary sibling, then rename, so nothing half-written is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    On any exception the temporary file is removed, so a reader never sees a partial ``path``.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{TMP_SUFFIX}")
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
    """Delete temporaries left by an interrupted run below ``directory``; return what was removed."""
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
