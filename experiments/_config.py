"""Read run configs through the real CLI parser and build parts of them without a Trainer."""

from __future__ import annotations

import importlib
from typing import Any

from experiments.run import cli_main


def load_config(configs: list[str], overrides: list[str] | None = None) -> dict[str, Any]:
    """Parse and validate ``--config`` files (+ overrides) through the CLI; returns the config as a dict."""
    args = [a for c in configs for a in ("--config", c)] + list(overrides or [])
    return cli_main(args, run=False, instantiate=False).config.as_dict()


def build(spec: Any) -> Any:
    """Instantiate a ``{class_path, init_args}`` spec, recursively (plain values pass through)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        kwargs = {k: build(v) for k, v in (spec.get("init_args") or {}).items()}
        return getattr(importlib.import_module(module), name)(**kwargs)
    if isinstance(spec, list):
        return [build(v) for v in spec]
    return spec
