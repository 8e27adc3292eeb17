"""Shared command-line behaviour: bad input ends in one line and exit code 1, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["exit_on_bad_input", "CommandError", "one_line_error", "HELP_FLAGS"]

HELP_FLAGS = ("--help", "-h")


class CommandError(Exception):
    """An error whose message alone says what went wrong and what to do (a full disk, a locked run
    directory, a non-finite loss, ...): the commands print it as one line, without a traceback."""


_ONE_LINE = (ValueError, FileNotFoundError, CommandError)


def one_line_error(e: BaseException) -> bool:
    """Whether ``e`` is one of the errors shown as one line: itself, or raised ``from`` one (e.g. a dataset
    error wrapping a failed download), so the outer message, which adds context, is the one shown."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, _ONE_LINE):
            return True
        seen = seen.__cause__
    return False


@contextlib.contextmanager
def exit_on_bad_input() -> Iterator[None]:
    """Print ``error: <message>`` to stderr and exit 1 on ValueError / FileNotFoundError / CommandError (the
    errors this project raises for bad configs, data, checkpoints and runs that cannot go on); also on any
    error raised from one of them. ``HYDRA_FULL_ERROR=1`` shows the traceback."""
    try:
        yield
    except Exception as e:
        if not one_line_error(e) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(e).split("\n")) if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
