"""Threads that never lose: one vs two threads under OpenMP's wait policies (spin 300,000 times at a barrier,
sleep at once, or spin a bounded ``GOMP_SPINCOUNT``), alone and beside a competing busy process, each in a
fresh worker process; and the default ``train.py`` gives (``diffusion_lab.utils.cpu``: its environment
defaults, and as many threads as cores idle at the start)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from diffusion_lab.utils.cpu import CPU_ENV_DEFAULTS, OPENMP_WAIT_VARS, idle_cores

__all__ = ["run_threads", "CASES", "DEFAULT_CASE"]

ROOT = Path(__file__).resolve().parents[2]
# label -> (worker mode, threads (0: train.py's idle-core count), environment given to the worker)
CASES: dict[str, tuple[str, int, dict[str, str]]] = {
    "1 thread": ("configured", 1, {}),
    "2 threads, OpenMP default (spin 300,000)": ("default", 2, {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE (spin 0; configure_cpu's)": (
        "default",
        2,
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ),
    "2 threads, GOMP_SPINCOUNT=1000": ("default", 2, {"GOMP_SPINCOUNT": "1000"}),
    "2 threads, GOMP_SPINCOUNT=3000": ("default", 2, {"GOMP_SPINCOUNT": "3000"}),
    "2 threads, GOMP_SPINCOUNT=10000": ("default", 2, {"GOMP_SPINCOUNT": "10000"}),
    "train.py's default (idle cores at start, configure_cpu)": ("configured", 0, {}),
}
DEFAULT_CASE = "train.py's default (idle cores at start, configure_cpu)"


def _worker(mode: str, threads: int, extra: dict[str, str], seconds: float) -> dict:
    drop = set(CPU_ENV_DEFAULTS) | set(OPENMP_WAIT_VARS) | {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if k not in drop} | extra
    cmd = [sys.executable, "-m", "experiments.bench.worker", mode, str(threads), str(seconds)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(cases: dict, seconds: float, repeats: int) -> dict:
    names = list(cases)
    got: dict = {c: [] for c in names}
    for r in range(repeats):
        for case in names[r % len(names) :] + names[: r % len(names)]:
            got[case].append(_worker(*cases[case], seconds))
    return {c: (statistics.median(x["images_per_s"] for x in v), v[-1]["threads"]) for c, v in got.items()}


def run_threads(
    seconds: float = 3.0,
    repeats: int = 2,
    situations: tuple[str, ...] = ("alone", "beside a busy process"),
    cases: dict = CASES,
    log=print,
) -> list[dict]:
    rows = []
    for situation in situations:
        competitor = None
        if situation != "alone":
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            load = [round(x, 2) for x in os.getloadavg()]
            idle = idle_cores(1.0)  # "alone" means little on a shared machine: what was idle before
            rates = _measure(cases, seconds, repeats)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        one = rates["1 thread"][0]
        for case, (ips, threads) in rates.items():
            rows.append(
                {
                    "situation": situation,
                    "case": case,
                    "threads": threads,
                    "images_per_s": round(ips, 1),
                    "vs_one_thread": round(ips / one, 2),
                    "load_average_before": load,
                    "idle_cores_before": None if idle is None else round(idle, 2),
                }
            )
            log(f"  {situation:<22} {case:<58} {ips:7.1f} img/s  ({ips / one:.2f}x one thread)")
    return rows
