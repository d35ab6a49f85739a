"""What every floor uses: the error types and the one-line command door, provenance records, atomic writes and locks.

- errors: the error raised for bad input data (naming the file, key or option at fault) and the one helper every
  command door uses to turn a user error into one line on stderr and exit status 2 (``run_command``);
- provenance: Provenance records attached to every data file, checkpoint and result: versions, git commit, command.
- atomic writes and locks: write to a temporary sibling, then rename, so nothing half-written is left behind;
  one writer per output directory (``output_lock``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- errors

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MOREBRAIN_DEBUG"
USER_ERROR_STATUS = 2


class DataFormatError(ValueError):
    """Input data or a data option is invalid; the message names the file, key or option."""


# user errors defined above the data layer (module, class name): matched only when that module is loaded, so the
# data layer does not import the model side (an error of a module that was never imported cannot have been raised)
_LAZY_USER_ERRORS = (("lightning_modules.components.target_embedders", "MissingWeightsError"),)
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _user_error_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [DataFormatError]
    for module, name in _LAZY_USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            found.append(getattr(loaded, name))
    return tuple(found)


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, looked for in ``exc`` and the exceptions it was raised from (a
    ``DataFormatError`` raised inside a class jsonargparse instantiates arrives wrapped in its Union dump); an
    unwritable or read-only output path is one too. None for anything else (a bug: keep its traceback)."""
    types, seen = _user_error_types(), set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, types):
            return str(current)
        if isinstance(current, OSError) and current.errno in _UNWRITABLE and current.filename:
            if current.errno == errno.EROFS:
                return f"cannot write {current.filename}: {current.strerror}"
            return f"{current.strerror}: {current.filename}"
        current = current.__cause__ or current.__context__
    return None


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` on the command line or ``MOREBRAIN_DEBUG=1`` in the environment: keep full tracebacks."""
    return DEBUG_FLAG in (argv or ()) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")


def run_command(main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)``: a user error becomes ``error: <message>`` on stderr and exit status 2.

    ``argv`` defaults to ``sys.argv[1:]``; ``--debug`` is taken out of it (and ``MOREBRAIN_DEBUG=1`` read) to
    re-raise instead, with the full traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    if DEBUG_FLAG in args:
        os.environ[DEBUG_ENV] = "1"  # nested doors and child processes (DDP ranks) keep their tracebacks too
        args = [a for a in args if a != DEBUG_FLAG]
    try:
        status = main(args)
    except Exception as exc:  # noqa: BLE001 - only user errors are caught; anything else is re-raised below
        message = None if debug else user_error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0 if status is None else int(status)


# ---------------------------------------------------------------- provenance

TRACKED_PACKAGES = (
    "torch", "torchvision", "lightning", "diffusers", "transformers", "peft", "webdataset",
    "torchmetrics", "omegaconf", "numpy", "h5py", "pillow",
)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed version of each package (``"absent"`` when it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def git_commit(repo_dir: str | Path | None = None) -> str:
    """The git commit of the project source (with ``-dirty`` when the tree has changes), or ``"unknown"``."""
    cwd = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints of gigabytes stay out of memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(**extra: Any) -> dict[str, Any]:
    """A provenance record: creation time, command line, python, package versions, git commit, plus ``extra``."""
    record = {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "package_versions": package_versions(),
        "git_commit": git_commit(),
    }
    record.update(extra)
    return record


# ---------------------------------------------------------------- atomic

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
