"""What a resumable study step was computed from, so that a rerun redoes a step whose inputs changed.

A step (a fit, a ``predict``, a ridge fit) is named by its CLI arguments. Its inputs are those arguments plus the
contents of the local files they name: weights, checkpoints and caches (``*.safetensors``, ``*.bin``, ``*.ckpt``,
``*.npy``, directly or anywhere below a named directory) and config files (``*.yaml``, ``*.json``). The step's
own outputs (``save_dir``, ``default_root_dir``, ``val_cache_dir``, a resumed ``ckpt_path``) are named, not read.
``inputs_digest(args)`` -> sha256 hex; a step directory holds it in ``inputs.json``. A directory finished from
other inputs (a rebuilt world, refitted encoders, re-cached targets) or without a record is removed and redone,
with one line saying so, never read back.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from datamodules.common import write_json_atomic
from datamodules.target_cache import model_fingerprint

RECORD = "inputs.json"
CONTENT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".npy")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
OUTPUT_KEYS = ("save_dir", "default_root_dir", "val_cache_dir", "ckpt_path")
_SPLIT = re.compile(r"[=,{}\[\]\s]+")


def _named_paths(args: list[str]) -> list[Path]:
    """The existing local paths that ``args`` name (values of ``--key=value``, ``--config PATH``, dict and list
    values), the outputs' keys left out."""
    paths = []
    for arg in args:
        if arg.startswith("--") and "=" not in arg:
            continue  # a bare flag (``--config``): its value is the next argument
        key, value = arg.split("=", 1) if arg.startswith("--") else ("", arg)
        if key.endswith(OUTPUT_KEYS):
            continue
        paths += [Path(t) for t in _SPLIT.split(value) if t and not t.endswith(":") and Path(t).exists()]
    return paths


def _fingerprints(path: Path) -> list[str | None]:
    """A named file's content when it is weights, a cache or a config; below a named directory its weights and
    caches, and the JSON records at its top (a dataset's generator record, a world's manifest)."""
    if path.is_file():
        return [model_fingerprint(path)] if path.suffix in CONTENT_SUFFIXES + CONFIG_SUFFIXES else []
    top = [model_fingerprint(p) for p in sorted(path.glob("*.json")) if p.name != RECORD and p.is_file()]
    return [*top, model_fingerprint(path, CONTENT_SUFFIXES)]


def inputs_digest(args: list[str]) -> str:
    """sha256 of ``args`` and of the contents of the files they name."""
    named = [[str(p), _fingerprints(p)] for p in _named_paths(args)]
    return hashlib.sha256(json.dumps([list(args), named]).encode()).hexdigest()


def is_current(directory: str | Path, digest: str) -> bool:
    """``directory`` holds a record of exactly these inputs."""
    record = Path(directory) / RECORD
    try:
        return json.loads(record.read_text()).get("inputs_sha256") == digest
    except (OSError, ValueError, AttributeError):
        return False


def record_inputs(directory: str | Path, digest: str, args: list[str]) -> None:
    """Write ``directory/inputs.json`` (atomically) for a step computed from ``args``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(directory) / RECORD, {"inputs_sha256": digest, "args": list(args)})


def start_step(directory: str | Path, args: list[str], log=print) -> str:
    """Before a step writes ``directory``: remove it when it holds a step of other (or unrecorded) inputs, then
    record these. Returns the digest. A partial step of the same inputs is kept (it resumes)."""
    directory, digest = Path(directory), inputs_digest(args)
    if directory.exists() and not is_current(directory, digest):
        log(f"{directory}: computed from other inputs than this run's (or before inputs were recorded); redoing it")
        shutil.rmtree(directory)
    record_inputs(directory, digest, args)
    return digest
