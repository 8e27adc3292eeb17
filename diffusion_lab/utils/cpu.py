"""CPU runtime settings that must be in place before torch starts its OpenMP thread pool.

torch's CPU kernels run on an OpenMP team (GNU libgomp in the pip wheels). Every operator is a parallel
region that ends in a barrier, and a thread that reaches the barrier first spins for a while before it
sleeps. libgomp's default spins 300,000 times (``OMP_DISPLAY_ENV=VERBOSE`` shows ``GOMP_SPINCOUNT``): on an
idle machine that is the fastest way to wait, but beside a busy process it is the two-thread stall (our
second thread shares a core with the other process, the first spins at thousands of barriers per step).
``OMP_WAIT_POLICY=PASSIVE`` (spin 0) avoids the stall but gives up much of the two-thread gain on idle
cores, since every wake-up then goes through the kernel. The default here is a bounded spin
(``GOMP_SPINCOUNT``, see ``CPU_ENV_DEFAULTS``), chosen by ``make bench``'s "threads" section (fresh worker
processes, alone and beside a busy process, every candidate): experiments/bench/results.md. Beside a busy
process it is the thread count that protects the run: ``train.py`` starts as many threads as cores are idle
(:func:`default_threads`).

The OpenMP runtime reads its environment once, when torch's shared libraries are loaded, so
:func:`configure_cpu` must run before ``import torch``. ``diffusion_lab/__init__.py`` calls it, which
covers every entry point (``train.py``, ``python -m diffusion_lab.<command>``, ``python -m experiments.*``)
as long as nothing imports torch before the package. A variable the user has set is never overridden.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import MutableMapping

__all__ = [
    "configure_cpu",
    "idle_cores",
    "default_threads",
    "cpu_flags",
    "default_cpu_precision",
    "register_resolvers",
    "CPU_ENV_DEFAULTS",
    "OPENMP_WAIT_VARS",
]

# GOMP_SPINCOUNT: how many times a libgomp thread spins at a barrier before it sleeps (it wins over
# OMP_WAIT_POLICY in libgomp). KMP_BLOCKTIME is Intel OpenMP's (libiomp5) knob for the same thing, in ms,
# ignored by libgomp; not measured here (torch's pip wheels use libgomp), so it keeps the safe 0.
CPU_ENV_DEFAULTS: dict[str, str] = {"GOMP_SPINCOUNT": "30000", "KMP_BLOCKTIME": "0"}
# The user's wait settings: OMP_WAIT_POLICY is read by both runtimes, so a user who set it gets it unchanged
# (none of our spin defaults, which would override it); each of the others only blocks our own value of it.
OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def configure_cpu(
    threads: int | None = None, env: MutableMapping[str, str] | None = None, warn: bool = True
) -> dict[str, str]:
    """Set the OpenMP environment of this process (call before ``import torch``).

    Args:
        threads: if given, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (the size of torch's thread pool
            from the start); None leaves torch's default (one thread per core) or the user's setting.
        env: the environment to change (``os.environ`` by default; tests pass a dict).
        warn: warn when torch is already imported, i.e. when the settings come too late for this process
            (they still reach child processes).

    Returns:
        The variables this call set (those the user had set are left alone and not returned; a user's
        ``OMP_WAIT_POLICY`` also keeps the spin defaults out, since they would override it).
    """
    env = os.environ if env is None else env
    wanted = {} if "OMP_WAIT_POLICY" in env else dict(CPU_ENV_DEFAULTS)
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be a positive integer or null (torch's default), got {threads}")
        wanted.update(OMP_NUM_THREADS=str(int(threads)), MKL_NUM_THREADS=str(int(threads)))
    changed = {k: v for k, v in wanted.items() if k not in env}
    env.update(changed)
    if changed and warn and env is os.environ and "torch" in sys.modules:
        warnings.warn(
            "configure_cpu ran after `import torch`: OpenMP has read its settings already; "
            "import diffusion_lab before torch (or set GOMP_SPINCOUNT in the shell)",
            RuntimeWarning,
            stacklevel=2,
        )
    return changed


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def idle_cores(interval: float = 0.3) -> float | None:
    """Cores left idle by everything else over the next ``interval`` seconds (None without /proc/stat)."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores * (second[0] - first[0]) / (second[1] - first[1])


def default_threads(interval: float = 0.3) -> int:
    """torch threads for a run that did not choose: the cores idle right now, at least one.

    A thread on a core that another process keeps busy makes every parallel region wait for it, so on a
    shared machine fewer threads than cores run faster (make bench, "training" and "threads" sections).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = idle_cores(interval)
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.5)))


# CPU features behind fast bf16 matmuls and convolutions in oneDNN: x86 AVX512-BF16 and AMX-BF16, Arm's BF16
# extension (/proc/cpuinfo "Features"). Without them torch runs bf16 through slow conversion paths: on an
# AVX2-only CPU bf16-mixed trained unet_tiny at 32x32 about 8x slower than fp32 (README "Performance").
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); None where unreadable."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def default_cpu_precision(flags: frozenset[str] | None = None) -> str:
    """Lightning precision for CPU training: ``bf16-mixed`` on a CPU with bf16 units, else ``32-true``."""
    flags = cpu_flags() if flags is None else flags
    return "bf16-mixed" if flags and flags & BF16_CPU_FLAGS else "32-true"


def register_resolvers() -> None:
    """OmegaConf resolvers of the configs: ``${cpu_precision:}`` (the CPU trainer's default precision)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("cpu_precision", lambda: default_cpu_precision(), replace=True)
