"""The two-thread stall: one vs two threads, with OpenMP's default wait policy and with
``diffusion_lab.utils.cpu.configure_cpu``'s, alone and beside a competing busy process, each in a fresh
worker."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from diffusion_lab.utils.cpu import CPU_ENV_DEFAULTS

__all__ = ["run_threads"]

ROOT = Path(__file__).resolve().parents[2]
CASES = (("configured", 1), ("default", 2), ("configured", 2), ("configured", 0))
LABELS = {
    ("configured", 1): "1 thread",
    ("default", 2): "2 threads, OpenMP default (spin-wait)",
    ("configured", 2): "2 threads, configure_cpu (OMP_WAIT_POLICY=PASSIVE)",
    ("configured", 0): "train.py's default: idle cores at start, PASSIVE",
}


def _worker(mode: str, threads: int, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CPU_ENV_DEFAULTS and k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "experiments.bench.worker", mode, str(threads), str(seconds)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(seconds: float, repeats: int) -> dict:
    got: dict = {c: [] for c in CASES}
    for r in range(repeats):
        for case in CASES[r % len(CASES) :] + CASES[: r % len(CASES)]:
            got[case].append(_worker(*case, seconds))
    return {c: statistics.median(x["images_per_s"] for x in v) for c, v in got.items()}


def run_threads(seconds: float = 4.0, repeats: int = 2, log=print) -> list[dict]:
    rows = []
    for situation in ("alone", "beside a busy process"):
        competitor = None
        if situation != "alone":
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            rates = _measure(seconds, repeats)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        one = rates[("configured", 1)]
        for case, ips in rates.items():
            rows.append(
                {
                    "situation": situation,
                    "case": LABELS[case],
                    "images_per_s": round(ips, 1),
                    "vs_one_thread": round(ips / one, 2),
                }
            )
            log(f"  {situation:<22} {LABELS[case]:<52} {ips:7.1f} img/s  ({ips / one:.2f}x one thread)")
    return rows
