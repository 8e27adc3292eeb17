"""What this machine offers: CPU flags, torch and oneDNN builds, which oneDNN kernels bf16 work runs on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from experiments.bench.targets import cpu_kind

__all__ = ["describe_machine"]

FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16")

# A bf16 convolution and matmul with oneDNN's log on, in a fresh process (ONEDNN_VERBOSE is read at start).
_PROBE = (
    "import torch; c = torch.nn.Conv2d(32, 32, 3, padding=1).bfloat16();"
    "x = torch.randn(8, 32, 16, 16).bfloat16();"
    "c(x).sum().backward(); a = torch.randn(256, 256).bfloat16(); torch.mm(a, a)"
)


def _onednn_kernels() -> list[str]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    kernels = set()
    for line in done.stdout.splitlines():
        parts = line.split(",")
        if (
            len(parts) > 6
            and parts[2] == "primitive"
            and parts[3] == "exec"
            and parts[5] in ("convolution", "matmul")
        ):
            kernels.add(f"{parts[5]}: {parts[6]}")
    return sorted(kernels)


def describe_machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    kind = cpu_kind(frozenset(flags))
    return {
        "cpu": model,
        "cpu_kind": kind,
        "bf16_units": kind != "avx2",
        "precision": "bf16-mixed" if kind != "avx2" else "fp32 (no bf16 units: the CPU trainer's 32-true)",
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in FLAGS},
        "torch": torch.__version__,
        "onednn": torch.backends.mkldnn.is_available(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16_kernels": _onednn_kernels(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
