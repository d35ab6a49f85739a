"""Shared plumbing for the command-line doors: clear one-line errors and non-zero exits for bad input."""

from __future__ import annotations

from collections.abc import Callable

from datamodules.common import run_command


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a user error (``DataFormatError``, missing weights, an unwritable output path) becomes
    ``error: <message>`` on stderr and exit status 2; ``--debug`` or ``MOREBRAIN_DEBUG=1`` keeps the traceback
    (``datamodules.common.run_command``)."""
    return run_command(main, argv)
