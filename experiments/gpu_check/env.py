"""The machine: GPU name, memory, torch / CUDA / cuDNN / Lightning versions, and the measured matmul peaks
(fp32 exact, tf32 and bf16) that the model FLOP utilisation of the other sections is taken against."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch

from experiments.gpu_check.common import Ctx, Record, timed

__all__ = ["run_env", "matmul_peak"]

PACKAGES = ("torch", "lightning", "torchmetrics", "torchvision", "hydra-core", "omegaconf", "numpy")


def matmul_peak(n: int, dtype: torch.dtype, device: str, tf32: bool = False, reps: int = 10) -> float:
    """TFLOP/s of an n x n x n ``torch.mm`` on random data (2 n^3 FLOPs), the mean of ``reps`` products after
    three warm-ups. ``tf32`` lets cuBLAS round fp32 inputs to TF32 on the tensor cores."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b)
        seconds = timed(lambda: torch.mm(a, b), device, reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / seconds / 1e12


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _nvidia_smi() -> str | None:
    try:
        done = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_env(ctx: Ctx, rec: Record) -> None:
    rec["python"] = platform.python_version()
    rec["packages"] = _versions()
    rec["torch_cuda"] = torch.version.cuda
    rec["cpu_count"] = os.cpu_count()
    # what fp32 runs on by default (the fp32 eager rows): cuDNN convolutions in TF32, matmuls in full fp32
    rec["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    rec["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    if ctx.cuda:
        ok = rec.check("cuda_available", torch.cuda.is_available())
        if not ok:
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        p = torch.cuda.get_device_properties(0)
        rec["gpu"] = p.name
        rec["gpu_count"] = torch.cuda.device_count()
        rec["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        rec["multiprocessors"] = p.multi_processor_count
        rec["capability"] = f"{p.major}.{p.minor}"
        rec["cudnn"] = torch.backends.cudnn.version()
        rec["bf16_supported"] = torch.cuda.is_bf16_supported()
        rec["nvidia_smi"] = _nvidia_smi()
    else:
        rec["gpu"] = None
        rec["cpu"] = platform.processor() or platform.machine()
    rec.save()
    n = 512 if ctx.tiny else 8192
    rec["matmul_n"] = n
    peaks = {"bf16": matmul_peak(n, torch.bfloat16, ctx.device)}
    if ctx.cuda:
        peaks["tf32"] = matmul_peak(n, torch.float32, ctx.device, tf32=True)
    peaks["fp32"] = matmul_peak(n, torch.float32, ctx.device, reps=3 if ctx.cuda else 10)
    rec["peak_tflops"] = {k: float(f"{v:.3g}") for k, v in peaks.items()}
    rec.check("peaks_positive", all(v > 0 for v in peaks.values()))
