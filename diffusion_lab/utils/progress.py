"""Progress bars for long loops: a rich bar with ETA on a terminal, silence in logs and CI.

    from diffusion_lab.utils.progress import track
    for i in track(range(steps), "sampling (ddim)"):
        ...

``track`` shows a bar only when stderr is a terminal and ``DIFFUSION_LAB_PROGRESS`` is not ``0`` (set it to
``1`` to force bars on, e.g. under ``tmux pipe-pane``). Nested calls show only the outermost bar.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["track", "progress_enabled"]

T = TypeVar("T")
_active = 0  # depth of the bars now shown (an inner loop inside an outer bar stays quiet)


def progress_enabled() -> bool:
    """True when progress bars should be drawn: a terminal on stderr, or ``DIFFUSION_LAB_PROGRESS=1``."""
    flag = os.environ.get("DIFFUSION_LAB_PROGRESS")
    if flag is not None:
        return flag.strip().lower() not in ("0", "false", "no", "")
    if os.environ.get("CI", "").lower() == "true":
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``iterable``, showing a bar with count, rate and ETA where :func:`progress_enabled`."""
    global _active
    if _active or not progress_enabled():
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    _active += 1
    try:
        forced = os.environ.get("DIFFUSION_LAB_PROGRESS") is not None  # =1 draws even without a terminal
        console = Console(stderr=True, force_terminal=True if forced else None)
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in iterable:
                yield item
                bar.advance(task)
    finally:
        _active -= 1
