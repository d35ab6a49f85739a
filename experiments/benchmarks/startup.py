"""Process start-up: ``python -m experiments.run --help`` against the imports it cannot avoid, in one run.

Each command runs as a fresh process (the way a user or a Slurm task starts it), ``repeats`` times, interleaved,
with the environment of ``make`` (offline hub flags); the median wall time of each is reported:

- ``python``: the interpreter alone (``-c pass``);
- ``torch``: ``import torch``;
- ``lightning``: ``import lightning`` (which imports torchmetrics, and through it torchvision, ``torch._dynamo``,
  transformers and ``scipy.signal``);
- ``help``: ``python -m experiments.run --help`` (LightningCLI's parser over both stages' modules).

The issue's target is an absolute 5 s for ``help`` on a fresh install; ``help_vs_lightning`` says how much of it
is the project's own (the rest is the pinned ``lightning`` import, which no project code runs before).
``bytecode`` says whether the project's imports have cached bytecode (``make install`` writes it:
``experiments.precompile``); without it every start recompiles them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"python": ["-c", "pass"], "torch": ["-c", "import torch"], "lightning": ["-c", "import lightning"],
            "help": ["-m", "experiments.run", "--help"]}


def _time(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _has_bytecode(module: str) -> bool:
    import importlib.util

    spec = importlib.util.find_spec(module)
    cached = spec.cached if spec is not None else None
    return bool(cached) and Path(cached).is_file()


def run(repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for _ in range(warmup):  # the first start after an install fills the OS page cache
        for args in COMMANDS.values():
            _time(args, env)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for i in range(repeats):
        for name in (list(COMMANDS) if i % 2 == 0 else list(COMMANDS)[::-1]):
            times[name].append(_time(COMMANDS[name], env))
    s = {name: round(statistics.median(v), 3) for name, v in times.items()}
    return {"benchmark": "process_start_up", "seconds": s,
            "config": {"repeats": repeats, "warmup": warmup, "python": sys.executable},
            "bytecode": {m: _has_bytecode(m) for m in ("lightning", "torchmetrics", "experiments.run")},
            "help_vs_lightning": round(s["help"] / s["lightning"], 3),
            "project_s": round(s["help"] - s["lightning"], 3),
            "target_help_s": 5.0}
