"""Checkpoint files are data, never code: every load goes through ``torch.load(..., weights_only=True)``.

``load_checkpoint_data`` refuses a file whose pickle holds anything but tensors and plain Python data (a crafted
``__reduce__`` payload is never run) with one line naming the option the path came from.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from datamodules.common import DataFormatError


class UnsafeCheckpointError(DataFormatError):
    """A checkpoint holds objects that only a full (code-running) unpickling could rebuild (a user error: one line
    and exit status 2 at a command door)."""


def refusal(option: str, path: str | Path, exc: BaseException) -> UnsafeCheckpointError:
    """The one-line error for a file that ``torch.load(weights_only=True)`` refused."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    reason = f"it needs {found.group(1)}" if found else type(exc).__name__
    return UnsafeCheckpointError(f"{option}: {path} holds objects other than tensors and plain data ({reason}); "
                                 "refused: checkpoints are loaded as data (weights_only=True), never run as code")


def load_checkpoint_data(path: str | Path, option: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file needing arbitrary unpickling raises
    ``UnsafeCheckpointError`` naming ``option`` and ``path``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refusal(option, path, exc) from None


def load_state_dict_file(path: str | Path, option: str) -> dict[str, Any]:
    """The ``state_dict`` of the checkpoint at ``path`` (loaded as data); a missing file raises
    ``FileNotFoundError`` naming ``option``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option}: no checkpoint at {path}")
    return load_checkpoint_data(path, option)["state_dict"]
