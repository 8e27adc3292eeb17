"""Matmul peaks of this machine and training throughput of the project's U-Nets under every switch."""

from __future__ import annotations

import time

import torch

from diffusion_lab.utils.cpu import default_cpu_precision
from experiments.bench.setups import TrainSetup, build_unet, flops_per_image, train_step
from experiments.bench.timing import interleave

__all__ = ["matmul_peaks", "training_cases", "run_training", "peak_shares"]


def matmul_peaks(threads: tuple[int, ...] = (1, 2), n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of an n x n ``torch.mm`` in fp32 (MKL) and bf16 (oneDNN), best and median of ``repeats``,
    by wall clock and (one thread) by CPU time; fp32 and bf16 alternate.

    On a CPU without bf16 units the bf16 product runs on a conversion path at well under 1 GFLOP/s (a
    2048 x 2048 product would take a minute), so there it is measured at 256 x 256 (``bf16_n`` says which).
    """
    out: dict = {}
    bf16_n = n if default_cpu_precision() == "bf16-mixed" else min(n, 256)
    mats = {
        dt: (torch.randn(m, m, dtype=dt), torch.randn(m, m, dtype=dt))
        for dt, m in ((torch.float32, n), (torch.bfloat16, bf16_n))
    }
    out["bf16_n"] = bf16_n
    for t in threads:
        torch.set_num_threads(t)
        walls: dict = {dt: [] for dt in mats}
        cpus: dict = {dt: [] for dt in mats}
        for a, b in mats.values():
            torch.mm(a, b)  # warm-up
        for _ in range(repeats):
            for dt, (a, b) in mats.items():
                flop = 2 * a.shape[0] ** 3
                w0, c0 = time.perf_counter(), time.process_time()
                torch.mm(a, b)
                walls[dt].append(flop / (time.perf_counter() - w0) / 1e9)
                cpus[dt].append(flop / max(time.process_time() - c0, 1e-9) / 1e9)
        for dt in mats:
            name = "fp32" if dt == torch.float32 else "bf16"
            w = sorted(walls[dt])
            out[f"{name}_{t}t"] = {
                "best_gflops": round(w[-1], 1),
                "median_gflops": round(w[len(w) // 2], 1),
                "best_gflops_cpu_time": round(max(cpus[dt]), 1) if t == 1 else None,
            }
    return out


def peak_shares(row: dict, peaks: dict) -> dict:
    """A training row's share of the matmul peak of its dtype and thread count (wall clock, and for one
    thread by CPU time), from ``peaks`` (possibly measured in another part of a merged bench)."""
    key = f"{'bf16' if row['setup'].startswith('bf16') else 'fp32'}_{row['setup'].count('2 threads') + 1}t"
    peak = peaks.get(key, {})
    flops = row["gflop_per_image"]
    wall, cpu = peak.get("best_gflops"), peak.get("best_gflops_cpu_time")
    return {
        "pct_of_matmul_peak": round(100 * row["images_per_s"] * flops / wall, 1) if wall else None,
        "pct_of_matmul_peak_cpu_time": round(100 * row["images_per_cpu_s"] * flops / cpu, 1) if cpu else None,
    }


def training_cases(compile_: bool, bf16_units: bool = True) -> list[tuple[str, int, dict[str, TrainSetup]]]:
    """(model, image size, {key: setup}); the first setup of each group is the reference ("today").

    On a CPU without bf16 units (the CPU trainer trains in fp32 there, and bf16 runs many times slower) the
    fp32 switches are measured instead of the bf16 ones.
    """
    if bf16_units:
        tiny32 = {
            "fp32": TrainSetup(),
            "bf16": TrainSetup(bf16=True),
            "bf16_fused": TrainSetup(bf16=True, fused=True),
            "fp32_cl": TrainSetup(channels_last=True),
            "bf16_cl": TrainSetup(bf16=True, channels_last=True),
            "bf16_b64": TrainSetup(bf16=True, batch=64),
            "bf16_b256": TrainSetup(bf16=True, batch=256),
            "fp32_2t": TrainSetup(threads=2),
            "bf16_2t": TrainSetup(bf16=True, threads=2),
        }
        if compile_:
            tiny32["bf16_fused_compile"] = TrainSetup(bf16=True, fused=True, compile=True)
        small32 = {
            "fp32": TrainSetup(batch=16),
            "bf16": TrainSetup(bf16=True, batch=16),
            "bf16_fused": TrainSetup(bf16=True, fused=True, batch=16),
        }
        if compile_:
            small32["bf16_fused_compile"] = TrainSetup(bf16=True, fused=True, compile=True, batch=16)
    else:
        tiny32 = {
            "fp32": TrainSetup(),
            "fp32_fused": TrainSetup(fused=True),
            "fp32_cl": TrainSetup(channels_last=True),
            "fp32_b64": TrainSetup(batch=64),
            "fp32_b256": TrainSetup(batch=256),
        }
        if compile_:
            tiny32["fp32_compile"] = TrainSetup(compile=True)
            tiny32["fp32_fused_compile"] = TrainSetup(fused=True, compile=True)
        small32 = {
            "fp32": TrainSetup(batch=16),
            "fp32_fused": TrainSetup(fused=True, batch=16),
            "fp32_cl": TrainSetup(channels_last=True, batch=16),
            "fp32_b32": TrainSetup(batch=32),
        }
        if compile_:
            small32["fp32_fused_compile"] = TrainSetup(fused=True, compile=True, batch=16)
    prec = "bf16" if bf16_units else "fp32"
    tiny16 = {
        "fp32": TrainSetup(batch=64),
        f"{prec}_2t": TrainSetup(bf16=bf16_units, batch=64, threads=2),
    }
    if bf16_units:
        tiny16["bf16"] = TrainSetup(bf16=True, batch=64)
    if compile_:  # the `make train` shape: does compile=true pay within a 3,000-step run?
        tiny16[f"{prec}_compile"] = TrainSetup(bf16=bf16_units, batch=64, compile=True)
    return [("unet_tiny", 32, tiny32), ("unet_tiny", 16, tiny16), ("unet_small", 32, small32)]


def run_training(
    peaks: dict,
    seconds: float,
    repeats: int,
    compile_: bool,
    bf16_units: bool = True,
    two_threads: bool = True,
    log=print,
) -> list[dict]:
    """Every setup of :func:`training_cases`, interleaved per group; ``two_threads=False`` leaves out the
    two-thread rows (measure them on an idle machine)."""
    rows = []
    for model_name, size, setups in training_cases(compile_, bf16_units):
        if not two_threads:
            setups = {k: v for k, v in setups.items() if v.threads == 1}
        flops = flops_per_image(build_unet(model_name, size), (1, size, size))
        steps, compile_s = {}, {}
        for key, setup in setups.items():
            steps[key], warm = train_step(model_name, size, setup)
            if setup.compile:
                compile_s[key] = round(warm, 1)
                log(f"  {model_name} {size}px {key}: compiled in {warm:.1f} s (first two steps)")
        threads = {k: s.threads for k, s in setups.items()}
        timed = interleave(steps, seconds, repeats, threads)
        ref = next(iter(setups))
        for key, setup in setups.items():
            t = timed[key]
            peak_row = peaks.get(f"{'bf16' if setup.bf16 else 'fp32'}_{setup.threads}t", {})
            peak = peak_row.get("best_gflops")
            peak_cpu = peak_row.get("best_gflops_cpu_time")
            gflops = t["ips"] * flops / 1e9
            gflops_cpu = t["ips_cpu"] * flops / 1e9
            row = {
                "model": model_name,
                "image_size": size,
                "key": key,
                "setup": setup.label(),
                "images_per_s": round(t["ips"], 1),
                "images_per_cpu_s": round(t["ips_cpu"], 1),
                "repeats": t["ips_repeats"],
                "vs_reference": round(t["ips"] / timed[ref]["ips"], 2),
                "vs_reference_cpu": round(t["ips_cpu"] / timed[ref]["ips_cpu"], 2),
                "gflop_per_image": round(flops / 1e9, 4),
                "achieved_gflops": round(gflops, 1),
                "pct_of_matmul_peak": round(100 * gflops / peak, 1) if peak else None,
                # one thread: both by CPU time, nearly independent of what else runs on the machine
                "pct_of_matmul_peak_cpu_time": round(100 * gflops_cpu / peak_cpu, 1) if peak_cpu else None,
                "compile_seconds": compile_s.get(key),
            }
            rows.append(row)
            log(
                f"  {model_name} {size}px {row['setup']:<52} {row['images_per_s']:8.1f} img/s "
                f"({row['vs_reference']:.2f}x; per CPU-s {row['images_per_cpu_s']:.0f}, "
                f"{row['vs_reference_cpu']:.2f}x)  {gflops:6.1f} GFLOP/s"
            )
    return rows
