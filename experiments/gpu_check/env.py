"""The machine: GPU name, memory, torch / CUDA / cuDNN / Lightning versions, the measured matmul peaks (fp32
exact, tf32 and bf16) that the model FLOP utilisation of the other sections is taken against, and what this
build's GroupNorm does: whether it keeps a channels_last input in NHWC, the dtype autocast gives it, and the
U-Net's bf16 GroupNorm against an fp64 reference on the device."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time

import torch

from experiments.gpu_check.common import Ctx, Record, sync

__all__ = ["run_env", "matmul_peak", "group_norm_facts"]

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
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        seconds = (time.perf_counter() - start) / reps
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


def group_norm_facts(device: str) -> dict:
    """What GroupNorm does on ``device`` in this build.

    ``keeps_nhwc``: ``F.group_norm`` of a channels_last input returns channels_last (the CPU kernel does;
    CUDA's makes the input contiguous NCHW, so every norm of an NHWC network copies twice). ``autocast_dtype``
    of ``nn.GroupNorm`` and of the U-Net's :class:`~diffusion_lab.models.unet.GroupNorm` on a bf16 input
    under bf16 autocast (CUDA autocast: fp32 and bf16). ``bf16_error``: the U-Net's GroupNorm in bf16 against
    fp64 on the same bf16 input (mean 20: where bf16 statistics would fail), as a share of the largest output;
    one bf16 rounding is 2^-8 = 0.0039.
    """
    import torch.nn.functional as F

    from diffusion_lab.models.unet import GroupNorm

    torch.manual_seed(0)
    x = (torch.randn(8, 128, 32, 32, device=device) * 3 + 20).bfloat16()
    cl = x.contiguous(memory_format=torch.channels_last)
    out = {"keeps_nhwc": F.group_norm(cl, 32).is_contiguous(memory_format=torch.channels_last)}
    torch_norm, ours = torch.nn.GroupNorm(32, 128).to(device), GroupNorm(32, 128).to(device)
    for norm in (torch_norm, ours):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    with torch.autocast(device.split(":")[0], torch.bfloat16):
        out["autocast_dtype"] = {
            "nn.GroupNorm": str(torch_norm(x).dtype),
            "unet.GroupNorm": str(ours(x).dtype),
        }
        y = ours(cl)
    out["unet_group_norm_keeps_nhwc"] = y.is_contiguous(memory_format=torch.channels_last)
    w, b = ours.weight, ours.bias
    if device.startswith("cuda"):  # the CUDA path casts weight and bias to the input's dtype
        w, b = w.bfloat16(), b.bfloat16()
    ref = F.group_norm(x.double(), 32, w.double(), b.double(), ours.eps)
    out["bf16_error"] = float(((y.double() - ref).abs().max() / ref.abs().max()).item())
    return out


def run_env(ctx: Ctx, rec: Record) -> None:
    rec["python"] = platform.python_version()
    rec["packages"] = _versions()
    rec["torch_cuda"] = torch.version.cuda
    rec["cpu_count"] = os.cpu_count()
    # what fp32 runs on by default (the fp32 eager rows): cuDNN convolutions in TF32, matmuls in full fp32
    # what fp32 runs on: cuDNN convolutions in TF32 (torch's default), matmuls as train() sets them on a GPU
    from diffusion_lab.utils.device import configure_gpu

    rec["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
    rec["configure_gpu"] = configure_gpu(ctx.device)
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
    rec["group_norm"] = gn = group_norm_facts(ctx.device)
    rec.check(
        "bf16 GroupNorm stays bf16 under autocast", gn["autocast_dtype"]["unet.GroupNorm"] == "torch.bfloat16"
    )
    rec.check(
        "bf16 GroupNorm within one bf16 rounding of fp64", gn["bf16_error"] <= 2.0**-8, gn["bf16_error"]
    )
    n = 512 if ctx.tiny else 8192
    rec["matmul_n"] = n
    peaks = {"bf16": matmul_peak(n, torch.bfloat16, ctx.device)}
    if ctx.cuda:
        peaks["tf32"] = matmul_peak(n, torch.float32, ctx.device, tf32=True)
    peaks["fp32"] = matmul_peak(n, torch.float32, ctx.device, reps=3 if ctx.cuda else 10)
    rec["peak_tflops"] = {k: float(f"{v:.3g}") for k, v in peaks.items()}
    rec.check("peaks_positive", all(v > 0 for v in peaks.values()))
