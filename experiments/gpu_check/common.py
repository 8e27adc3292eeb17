"""What every section shares: the run context, the composed Hydra config, the section record, the timed-row
protocol and the host-sync counter."""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "Ctx",
    "Record",
    "SyncCounter",
    "compose_run_config",
    "first_line",
    "optimizer_of",
    "read_log",
    "sync",
    "time_steps",
    "toy_compile",
]

REPO = Path(__file__).resolve().parents[2]
CLOCK_TOLERANCE = 0.03  # CUDA events and the host clock disagree by more than this: the row is flagged


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@dataclass
class Ctx:
    """Where and how big: ``device`` ("cuda" or "cpu"), ``tiny`` (toy sizes), ``out`` (the results folder),
    ``work`` (run folders, checkpoints and the data cache: outside ``out``, whose files travel back from a
    GPU machine, and unet_cifar's checkpoints are 0.6 GB each), ``deadline`` (``time.time()`` by which the
    section must be done: rows that would not fit are skipped with the reason recorded)."""

    device: str
    tiny: bool
    out: Path
    work: Path
    deadline: float | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def left(self) -> float:
        """Seconds to the deadline (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.time()

    @property
    def image_size(self) -> int:
        """cifar10_ddpm's 32x32; 8x8 at toy size (every U-Net level still exists: 8, 4, 2, 1)."""
        return 8 if self.tiny else 32

    @property
    def batch(self) -> int:
        """cifar10_ddpm's batch 128 (toy: 4)."""
        return 4 if self.tiny else 128

    def timing(self) -> dict[str, int]:
        """Warm-up steps (after the first, timed alone), steps per repeat, repeats: every timed row."""
        return (
            {"warmup": 0, "steps": 1, "repeats": 3} if self.tiny else {"warmup": 3, "steps": 10, "repeats": 3}
        )

    def model_overrides(self, model: str) -> list[str]:
        """Toy widths of a model config (the architecture, levels and attention stay as they are)."""
        if not self.tiny:
            return []
        if model.startswith("unet"):
            return ["model.channels=16", "model.num_head_channels=-1", "model.num_heads=2"]
        if model.startswith("dit"):
            return ["model.hidden_size=32", "model.depth=2", "model.num_heads=2"]
        return []

    def base_overrides(self) -> list[str]:
        """experiment=cifar10_ddpm on the bundled digits as 3x32x32 images (nothing to download), trainer=gpu
        on the chosen device, csv logging, no FID during training."""
        o = [
            "experiment=cifar10_ddpm",
            "dataset=digits",
            f"dataset.image_size={self.image_size}",
            "dataset.channels=3",
            f"dataset.batch_size={self.batch}",
            "logger=csv",
            "print_config=false",
            "trainer.enable_progress_bar=false",
            "metrics.every_n_steps=0",
        ]
        if not self.cuda:
            o += ["trainer.accelerator=cpu"]
        return o


@contextlib.contextmanager
def toy_compile(ctx: Ctx) -> Iterator[None]:
    """On the CPU at toy size, ``Module.compile`` (what ``compile=true`` calls) traces with TorchDynamo and
    runs the graph eagerly (``backend="eager"``): the compile path in seconds, without inductor's C++ build of
    minutes. Elsewhere nothing changes."""
    if ctx.cuda or not ctx.tiny:
        yield
        return
    original = torch.nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        kwargs.pop("mode", None)
        kwargs["backend"] = "eager"
        return original(self, *args, **kwargs)

    torch.nn.Module.compile = compile_eager
    try:
        yield
    finally:
        torch.nn.Module.compile = original


def compose_run_config(ctx: Ctx, overrides: Sequence[str], run_dir: Path):
    """The run config ``train.py`` would see for ``overrides``, its folders under ``run_dir`` (as
    tests/integration/conftest.py composes it: Hydra's ``compose``, then the runtime's output dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from diffusion_lab.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.log_dir = str(run_dir)
        cfg.paths.output_dir = str(run_dir / "run")
        cfg.paths.cache_dir = str(ctx.work / "cache")
        del cfg["hydra"]
    # Hydra's runtime config is no longer needed (output_dir is set) and must not look initialised:
    # Lightning's DDP launcher would start the other ranks as Hydra jobs (hydra.run.dir=... on the command)
    HydraConfig.instance().cfg = None
    return cfg


def read_log(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) rows of ``key`` (e.g. "train/loss") in the run's CSV log."""
    files = sorted(Path(run_dir).rglob("metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    with files[0].open() as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]


def optimizer_of(module) -> torch.optim.Optimizer:
    """The optimizer ``train()`` would step: the module's own ``configure_optimizers`` (its fused switch)."""
    opt = module.configure_optimizers()
    return opt["optimizer"] if isinstance(opt, dict) else opt


class Record(dict):
    """A section's results, saved to ``path`` (JSON) on every :meth:`save`, so that a section killed by its
    time limit still leaves what it measured. ``check(name, ok)`` notes a pass/fail check."""

    def __init__(self, path: Path, **kw: Any):
        super().__init__(status="running", checks={}, **kw)
        self.path = path
        self.save()

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self["checks"][name] = bool(ok)
        if detail is not None:
            self.setdefault("check_details", {})[name] = detail
        self.save()
        return bool(ok)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ host syncs

SYNC_MESSAGE = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s warning
# Device-to-host reads as seen by the dispatcher (the CPU stand-in for CUDA's sync debug mode): a Python
# number or bool from a tensor, and the ops whose output size depends on the data.
HOST_READS = {
    "aten._local_scalar_dense.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
}
_SKIP_FRAMES = ("/torch/", "/warnings.py", "/contextlib.py", "gpu_check/common.py")


def call_site(stack: traceback.StackSummary) -> str:
    """The innermost frame outside torch itself and its two innermost callers outside generic helpers, each
    ``path:line (function)`` (the path from site-packages on, or relative to the repository), and the
    innermost frame of this repository when it is not among them."""

    def name(f: traceback.FrameSummary) -> str:
        path = f.filename
        if "site-packages/" in path:
            path = path.split("site-packages/", 1)[1]
        elif path.startswith(str(REPO)):
            path = path[len(str(REPO)) + 1 :]
        return f"{path}:{f.lineno} ({f.name})"

    frames = [f for f in stack if not any(s in f.filename for s in _SKIP_FRAMES)]
    if not frames:
        return "?"
    # the innermost frame, then the two innermost callers outside generic helpers (apply_to_collection & co)
    callers = [f for f in frames[:-1] if "apply_func.py" not in f.filename]
    chain = [frames[-1], *callers[-2:][::-1]]
    ours = [f for f in frames if f.filename.startswith(str(REPO)) and "site-packages" not in f.filename]
    if ours and ours[-1] not in chain:
        chain.append(ours[-1])
    return " <- ".join(name(f) for f in chain)


class _HostReads(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.counts[f"{func.__name__}: {call_site(traceback.extract_stack()[:-1])}"] += 1
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Host syncs while active, by call site: on CUDA ``torch.cuda.set_sync_debug_mode("warn")`` with its
    warnings caught (each with the stack that raised it); on the CPU a dispatch mode that counts
    device-to-host reads (:data:`HOST_READS`). ``counts``: call site -> number; ``total``."""

    def __init__(self, device: str):
        self.device = device
        self.counts: Counter = Counter()
        self._exit: contextlib.ExitStack | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE in str(message):
            self.counts[call_site(traceback.extract_stack()[:-1])] += 1
        else:
            self._showwarning(message, category, filename, lineno, file, line)

    def __enter__(self) -> SyncCounter:
        self._exit = contextlib.ExitStack()
        if self.device.startswith("cuda"):
            self._exit.enter_context(warnings.catch_warnings())
            warnings.simplefilter("always")
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._show
            old = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._exit.callback(torch.cuda.set_sync_debug_mode, old)
        else:
            self._exit.enter_context(_HostReads(self.counts))
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()


# -------------------------------------------------------------------------------------------- timed rows


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def time_steps(
    step: Callable[[], Any], ctx: Ctx, warmup: int, steps: int, repeats: int = 3, count_syncs: bool = True
) -> dict[str, Any]:
    """Time ``step`` as every row of the check is timed.

    The first call is timed alone (``first_step_s``: compile, cuDNN autotuning, lazy initialisation), then
    ``warmup`` untimed calls; the caching allocator's blocks are released and the peak counters reset; then
    ``repeats`` x ``steps`` calls, each repeat between two device synchronisations and measured twice: CUDA
    events recorded around the loop (device time) and the host clock (``perf_counter``, the loop plus the
    drain of the queue). ``clocks_disagree`` when the two differ by more than 3%. Inside the timed loops no
    synchronisation happens, and the host syncs that the step itself makes are counted by call site
    (``syncs_in_timed_loop``; :class:`SyncCounter`).

    Memory (CUDA): ``first_step_peak_gib`` / ``first_step_reserved_gib`` over the first call and the
    warm-up (under ``torch.backends.cudnn.benchmark`` the reserved memory includes the workspaces that cuDNN
    tried), then ``steady_peak_gib`` (the most allocated at once in the timed steps: what the step needs) and
    ``steady_reserved_gib`` (the allocator's pool at the end).

    Returns the row's timing fields; ``ms_per_step`` is the median repeat by CUDA events (host clock on the
    CPU).
    """
    cuda = ctx.cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    sync(ctx.device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    sync(ctx.device)
    row: dict[str, Any] = {"first_step_s": round(first, 2), "warmup_steps": warmup}
    if cuda:
        row["first_step_peak_gib"] = _gib(torch.cuda.max_memory_allocated())
        row["first_step_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    host, device = [], []
    counter = SyncCounter(ctx.device)
    for _ in range(repeats):
        sync(ctx.device)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with counter if count_syncs else contextlib.nullcontext():
            t0 = time.perf_counter()
            if cuda:
                begin.record()
            for _ in range(steps):
                step()
            if cuda:
                end.record()
        sync(ctx.device)
        host.append((time.perf_counter() - t0) / steps)
        if cuda:
            device.append(begin.elapsed_time(end) / 1000 / steps)
    ms = [1000 * s for s in (device or host)]
    row.update(
        steps_per_repeat=steps,
        repeats=repeats,
        ms_per_step=round(statistics.median(ms), 3),
        ms_repeats=[round(v, 3) for v in ms],
        ms_host_repeats=[round(1000 * v, 3) for v in host],
    )
    if device:
        gap = abs(statistics.median(host) - statistics.median(device)) / statistics.median(device)
        row["clock_gap_pct"] = round(100 * gap, 2)
        row["clocks_disagree"] = gap > CLOCK_TOLERANCE
        row["steady_peak_gib"] = _gib(torch.cuda.max_memory_allocated())
        row["steady_reserved_gib"] = _gib(torch.cuda.memory_reserved())
    if count_syncs:
        row["syncs_in_timed_loop"] = counter.total
        row["sync_sites"] = dict(counter.counts.most_common(10))
    return row


def profile_steps(step: Callable[[], Any], ctx: Ctx, steps: int = 3, top: int = 12) -> dict[str, Any]:
    """``torch.profiler`` over ``steps`` calls of an already warm ``step``: a run of its own, never a timed
    one. The ``top`` operators by self time on the device (the CPU on a CPU run), and the time in casts
    (``aten::_to_copy``) and layout copies (``aten::copy_`` / ``contiguous``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(ctx.device)
    attr = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
    # the operators (CPU-side events: their self device time is that of the kernels they launched), not the
    # kernels themselves, which would count the same time twice
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]

    def share(names: tuple[str, ...]) -> float:
        return round(100 * sum(getattr(e, attr) for e in events if e.key in names) / total, 1)

    return {
        "clock": "device" if ctx.cuda else "cpu",
        "ms_per_step": round(total / 1000 / steps, 3),
        "top_ops": [
            {"op": e.key, "pct": round(100 * getattr(e, attr) / total, 1), "calls_per_step": e.count // steps}
            for e in rows
        ],
        "casts_pct": share(("aten::_to_copy", "aten::to")),
        "copies_pct": share(("aten::copy_", "aten::contiguous", "aten::clone")),
        "group_norm_pct": share(("aten::native_group_norm", "aten::native_group_norm_backward")),
    }
