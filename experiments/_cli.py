"""Shared plumbing for the command-line doors: clear one-line errors and non-zero exits for bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable

from datamodules.errors import DataFormatError


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a ``DataFormatError`` becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        return main(argv)
    except DataFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
