"""Interleaved timing: every case runs in turn, in a rotated order each repeat, and the medians are kept."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["interleave", "Timed"]

# A case runs one unit of work (a training step, a sampling run) and returns how many images it made.
Unit = Callable[[], int]


class Timed(dict):
    """Median rates of one case: ``ips`` (images per wall second), ``ips_cpu`` (per CPU second of this
    process: with one thread, nearly independent of what else runs on the machine), and the raw repeats."""


def interleave(
    cases: dict[str, Unit], seconds: float, repeats: int, threads: dict[str, int] | int = 1
) -> dict[str, Timed]:
    """Time every case ``repeats`` times for at least ``seconds`` (and one unit) each, interleaved.

    ``threads``: torch threads per case (set before each of its slots), or one count for all.
    """
    names = list(cases)
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            torch.set_num_threads(threads if isinstance(threads, int) else threads[k])
            n, w0, c0 = 0, time.perf_counter(), time.process_time()
            while True:
                n += cases[k]()
                wall = time.perf_counter() - w0
                if wall >= seconds:
                    break
            walls[k].append(n / wall)
            cpus[k].append(n / max(time.process_time() - c0, 1e-9))
    return {
        k: Timed(
            ips=statistics.median(walls[k]),
            ips_cpu=statistics.median(cpus[k]),
            ips_repeats=[round(x, 1) for x in walls[k]],
        )
        for k in names
    }
