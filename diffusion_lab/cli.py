"""Shared command-line behaviour: bad input ends in one line and exit code 1, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["exit_on_bad_input"]


@contextlib.contextmanager
def exit_on_bad_input() -> Iterator[None]:
    """Print ``error: <message>`` to stderr and exit 1 on ValueError / FileNotFoundError (the errors this
    project raises for bad configs, data and checkpoints); ``HYDRA_FULL_ERROR=1`` shows the traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
