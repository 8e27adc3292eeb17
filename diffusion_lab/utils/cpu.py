"""CPU runtime settings that must be in place before torch starts its OpenMP thread pool.

torch's CPU kernels run on an OpenMP team (GNU libgomp in the pip wheels). Every operator is a parallel
region that ends in a barrier, and by default a thread that reaches the barrier first spins for a while
before it sleeps. On a machine shared with other work that is the two-thread stall: our second thread
shares a core with another process, the first one spins at thousands of barriers per training step, and
the scheduler keeps both our threads and the other process fighting over the cores. libgomp's default
spins 300,000 times at every barrier (``OMP_DISPLAY_ENV=VERBOSE`` shows ``GOMP_SPINCOUNT``);
``OMP_WAIT_POLICY=PASSIVE`` makes it 0, so a waiting thread sleeps at once and hands its core back.
``make bench`` ("threads" section, fresh worker processes) measures both policies and bounded
spinning (``GOMP_SPINCOUNT``), alone and beside a busy process: experiments/bench/results.md. Beside a busy
process every spin count of 10,000 or more stalled two threads far worse than PASSIVE (0.19x-0.61x of one
thread against 0.88x), so PASSIVE stays the default; ``train.py`` also starts only as many threads as cores
are idle (:func:`default_threads`).

The OpenMP runtime reads its environment once, when torch's shared libraries are loaded, so
:func:`configure_cpu` must run before ``import torch``. Importing the package changes nothing (a library
leaves its host program's environment alone): the commands call :func:`configure_command` first thing,
before their modules import torch (``train.py``, ``python -m diffusion_lab.<command>``), and the Python
API does it when asked (``diffusion_lab.load(..., configure_threads=True)``, likewise ``train``). A
variable the user has set is never overridden.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import MutableMapping

__all__ = [
    "configure_cpu",
    "configure_command",
    "idle_cores",
    "default_threads",
    "cpu_flags",
    "default_cpu_precision",
    "register_resolvers",
    "CPU_ENV_DEFAULTS",
    "OPENMP_WAIT_VARS",
]

# OMP_WAIT_POLICY is read by both GNU (libgomp) and Intel (libiomp5) OpenMP; KMP_BLOCKTIME is Intel's
# own knob for the same thing (ms a thread spins before sleeping) and is ignored by libgomp.
CPU_ENV_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# Every variable that sets how OpenMP threads wait (libgomp: GOMP_SPINCOUNT wins over OMP_WAIT_POLICY).
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
        The variables this call set (those the user had set are left alone and not returned).
    """
    env = os.environ if env is None else env
    wanted = dict(CPU_ENV_DEFAULTS)
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be a positive integer or null (torch's default), got {threads}")
        wanted.update(OMP_NUM_THREADS=str(int(threads)), MKL_NUM_THREADS=str(int(threads)))
    changed = {k: v for k, v in wanted.items() if k not in env}
    env.update(changed)
    if changed and warn and env is os.environ and "torch" in sys.modules:
        warnings.warn(
            "configure_cpu ran after `import torch`: OpenMP has read its settings already (they still "
            "reach child processes); call it before torch is imported, or set OMP_WAIT_POLICY=PASSIVE in the "
            "shell",
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
    """OmegaConf resolvers of the configs: ``${cpu_precision:}`` (the CPU trainer's default precision).

    Called where configs are composed (the commands, ``diffusion_lab.train``); idempotent, and a resolver of
    that name that the host program registered first is kept.
    """
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cpu_precision"):
        OmegaConf.register_new_resolver("cpu_precision", lambda: default_cpu_precision())


def configure_command(threads: int | None = None) -> None:
    """What a command does before anything else: OpenMP's environment (:func:`configure_cpu`, silent when
    torch is loaded already) and the configs' resolvers (:func:`register_resolvers`).

    Commands call it at the top of their module, under ``if __name__ == "__main__":``, before the module's
    imports load torch; importing a command's module as a library does not.
    """
    configure_cpu(threads, warn=False)
    register_resolvers()
