"""Shared command-line behaviour: bad input ends in one line and exit code 1, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["exit_on_bad_input", "HELP_FLAGS", "print_command_help"]

HELP_FLAGS = ("--help", "-h")


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


def print_command_help(usage: str, conf_dir: str | Path, groups: Sequence[str], config_yaml: str) -> None:
    """Help of a command that composes ``conf/`` without ``@hydra.main``, laid out like Hydra's ``--help``:
    the usage, the options of each config group, and the composed config."""
    print(usage.strip() + "\n\n== Configuration groups ==")
    print("Compose your configuration from those groups (group=option)\n")
    for group in groups:
        print(f"{group}: {', '.join(sorted(p.stem for p in (Path(conf_dir) / group).glob('*.yaml')))}")
    print("\n\n== Config ==\nOverride anything in the config (foo.bar=value)\n")
    print(config_yaml)
