"""Provenance records attached to every data file, checkpoint and result: versions, git commit, command."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

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
