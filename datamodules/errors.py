"""Errors raised for bad input data, each naming the file, key or option at fault, and the one helper every
command door uses to turn them into one line on stderr and exit status 2."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence

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
