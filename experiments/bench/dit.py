"""Diffusion Transformers on this machine: training and sampling images/s of the ``conf/model/dit_*`` sizes in
fp32, bf16 autocast and bf16 compiled, their GFLOP per image and the share of the measured matmul peaks.

A transformer's work is almost all large matrix multiplications (QKV, MLP, attention), the operation bf16
matrix units are built for; the U-Net's is 3x3 convolutions on few channels. These rows say how much of the
peak each backbone reaches, at 32x32 one-channel images (Hoda), v objective, one thread.
"""

from __future__ import annotations

from experiments.bench.sampling import run_sampling_speed
from experiments.bench.setups import TrainSetup, build_backbone, flops_per_image, train_step
from experiments.bench.timing import interleave

__all__ = ["DIT_MODELS", "run_dit"]

# model -> (training batch, images per sampling run); the batches keep one step near a second or less
DIT_MODELS = {
    "dit_tiny": (128, 32),
    "dit_tiny2": (32, 8),
    "dit_s4": (16, 4),
    "dit_s2": (8, 2),
    "dit_b2": (4, 1),
}
DEFAULT_MODELS = ("dit_tiny", "dit_tiny2", "dit_s4", "dit_s2")
SAMPLER = {"dpm_solver_20": ("dpm_solver", 20)}


def _pct(gflops: float, peak: float | None) -> float | None:
    return round(100 * gflops / peak, 1) if peak else None


def run_dit(
    peaks: dict,
    seconds: float,
    repeats: int,
    compile_: bool,
    models: tuple[str, ...] = DEFAULT_MODELS,
    size: int = 32,
    log=print,
) -> list[dict]:
    """One row per (model, work, variant): work is ``train`` (one AdamW step on a fixed batch) or
    ``sample dpm_solver_20`` (DPM-Solver++(2M), 20 network evaluations per image).

    ``pct_of_peak`` compares with the matmul peak of the row's own dtype, ``pct_of_bf16_peak`` with the bf16
    one (one thread, ``peaks`` from :func:`~experiments.bench.training.matmul_peaks`; None when not measured).
    """
    bf16_peak = peaks.get("bf16_1t", {}).get("best_gflops")
    rows: list[dict] = []
    for name in models:
        batch, n_sample = DIT_MODELS[name]
        model = build_backbone(name, size)
        params = sum(p.numel() for p in model.parameters())
        train_flops = flops_per_image(model, (1, size, size))
        fwd_flops = flops_per_image(model, (1, size, size), backward=False)
        del model
        setups = {
            "fp32": TrainSetup(batch=batch),
            "bf16": TrainSetup(bf16=True, batch=batch),
        }
        if compile_:
            setups["bf16_compile"] = TrainSetup(bf16=True, compile=True, batch=batch)
        steps, compile_s = {}, {}
        for key, setup in setups.items():
            steps[key], warm = train_step(name, size, setup)
            if setup.compile:
                compile_s[key] = round(warm, 1)
        timed = interleave(steps, seconds, repeats, 1)
        common = {"model": name, "image_size": size, "parameters": params}
        for key, setup in setups.items():
            gflops = timed[key]["ips"] * train_flops / 1e9
            peak = peaks.get(f"{'bf16' if setup.bf16 else 'fp32'}_1t", {}).get("best_gflops")
            rows.append(
                {
                    **common,
                    "work": "train",
                    "variant": key,
                    "batch": batch,
                    "images_per_s": round(timed[key]["ips"], 2),
                    "images_per_cpu_s": round(timed[key]["ips_cpu"], 2),
                    "gflop_per_image": round(train_flops / 1e9, 3),
                    "achieved_gflops": round(gflops, 1),
                    "pct_of_peak": _pct(gflops, peak),
                    "pct_of_bf16_peak": _pct(gflops, bf16_peak),
                    "compile_seconds": compile_s.get(key),
                }
            )
            log(f"  {name} train {key:<13} {rows[-1]['images_per_s']:8.2f} img/s  {gflops:6.1f} GFLOP/s")
        sampled = run_sampling_speed(
            size=size,
            n=n_sample,
            seconds=seconds,
            repeats=repeats,
            compile_=compile_,
            log=lambda s: None,
            model_name=name,
            samplers=SAMPLER,
            variants=("fp32", "bf16", "bf16_compile"),
        )
        for s in sampled:
            nfe = SAMPLER[s["sampler"]][1]
            gflops = s["images_per_s"] * nfe * fwd_flops / 1e9
            peak = peaks.get(f"{'fp32' if s['variant'] == 'fp32' else 'bf16'}_1t", {}).get("best_gflops")
            rows.append(
                {
                    **common,
                    "work": f"sample {s['sampler']}",
                    "variant": s["variant"],
                    "batch": n_sample,
                    "images_per_s": s["images_per_s"],
                    "images_per_cpu_s": s["images_per_cpu_s"],
                    "gflop_per_image": round(nfe * fwd_flops / 1e9, 3),
                    "achieved_gflops": round(gflops, 1),
                    "pct_of_peak": _pct(gflops, peak),
                    "pct_of_bf16_peak": _pct(gflops, bf16_peak),
                    "compile_seconds": s["compile_seconds"],
                }
            )
            log(f"  {name} sample {s['variant']:<13} {s['images_per_s']:8.2f} img/s  {gflops:6.1f} GFLOP/s")
    return rows
