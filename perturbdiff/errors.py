"""How every command ends on an error a user can cause: one line on stderr, exit status 2.

``run_main(prog, fn)`` runs a command body (the ``perturbdiff`` subcommands, the launch scripts).
A ConfigError, DataError or CheckpointError (the project's own, which name the key, file, column
or condition), a conversion worker that was killed, and the ValueErrors and OSErrors that inputs,
files and disks cause are printed as
``<prog>: error: <one line>`` with exit status 2; a full disk names the path and the space left.
Ctrl-C is ``<prog>: interrupted`` with status 130. Any other exception is a bug and keeps its
traceback; ``PERTURBDIFF_DEBUG=1`` shows the traceback for the mapped ones too.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from .config import ConfigError
from .data.schema import DataError
from .outputs import out_of_space, space_error

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "PERTURBDIFF_DEBUG"


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (wrapped library errors can span many)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    from .foundation import CheckpointError  # torch: imported only when a command failed

    # BrokenProcessPool: a conversion worker was killed (out of memory, kill -9); its message says so
    return ConfigError, DataError, CheckpointError, ValueError, BrokenProcessPool


def describe(err: BaseException) -> str | None:
    """The one-line report of a user-caused error, or None for a bug (keep its traceback)."""
    if isinstance(err, _user_errors()):  # ours name the path themselves (a full disk too)
        return one_line(err)
    if isinstance(err, OSError):
        if out_of_space(err):
            return one_line(space_error(err.filename or ".", err))
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or one_line(err)}"
    return None


def run_main(prog: str, fn: Callable[[], object]) -> int:
    """Run ``fn``; 0 when it returns, 2 (one stderr line) for a user-caused error, 130 on Ctrl-C."""
    try:
        fn()
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - sorted into user errors (one line) and bugs (traceback)
        if os.environ.get(DEBUG_ENV):
            raise
        message = describe(err)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
