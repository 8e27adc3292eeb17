"""The module round trip in bf16, and bf16-mixed against fp32 on the same short run.

Two short runs through the real entry point (``diffusion_lab.train.train``, ``trainer=gpu`` without compile:
numerics, not speed) from the same seed, weights and noise: 32-true and bf16-mixed. Their loss curves must
agree within the noise of bf16 rounding. Then the bf16 run's last checkpoint goes through ``load_module``
with ``map_location`` the device (the module comes back there) and samples in bf16: under autocast, and
with the network cast to bf16 (one dtype end to end), as ``sample`` / ``evaluate`` / ``Pipeline.to(dtype=)``
do. The H200 run failed here once ("Input type (c10::BFloat16) and bias type (float)"): the reloaded module
had stayed on the CPU.
"""

from __future__ import annotations

import math
import time

import torch

from experiments.gpu_check.common import Ctx, Record, compose_run_config, read_log

__all__ = ["run_roundtrip", "BF16_LOSS_TOL", "CastModel"]

# bf16-mixed against 32-true, the mean loss of each window of 10 steps (5 at toy size): relative gap at most
# this. On the CPU (tests/integration/test_bf16_numerics.py) the per-step gap was 1.3e-4 and another seed
# moved the loss by up to 0.15; the GPU adds TF32 in the fp32 run and non-deterministic kernels in both.
BF16_LOSS_TOL = 0.02


class CastModel:
    """The network in one dtype (its weights cast, e.g. bf16) inside a float32 sampler: inputs cast to it,
    outputs back; no autocast, so no per-op casts."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model.to(dtype), dtype

    def __call__(self, x, t, y=None):
        return self.model(x.to(self.dtype), t, y).to(x.dtype)

    def __getattr__(self, name):
        if name in ("model", "dtype"):
            raise AttributeError(name)
        return getattr(self.model, name)


def _window_means(values: list[float], k: int) -> list[float]:
    return [sum(values[i : i + k]) / len(values[i : i + k]) for i in range(0, len(values), k)]


def run_roundtrip(ctx: Ctx, rec: Record) -> None:
    from diffusion_lab.samplers import sample
    from diffusion_lab.train import train
    from diffusion_lab.training.checkpoint import load_module

    steps = 10 if ctx.tiny else 60
    window = 5 if ctx.tiny else 10
    common = (
        ctx.base_overrides()
        + ctx.model_overrides("unet_cifar")
        + [
            "compile=false",
            "trainer.benchmark=false",  # cuDNN autotuning would cost more than these steps
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=1",
            "lr_scheduler.warmup_steps=10",
            "callbacks.sample_grid=null",
            "callbacks.best_checkpoint=null",
            f"callbacks.model_checkpoint.every_n_train_steps={steps}",
            "seed=0",
        ]
        + (["optimizer.lr=1e-3"] if ctx.tiny else [])
    )
    rec.update(steps=steps, window=window, rows=[])
    curves, last = {}, None
    for precision in ("32-true", "bf16-mixed"):
        run_dir = ctx.work / f"roundtrip_{precision}"
        cfg = compose_run_config(ctx, common + [f"trainer.precision={precision}"], run_dir)
        start = time.perf_counter()
        result = train(cfg)
        losses = [v for _, v in read_log(run_dir / "run", "train/loss")]
        curves[precision] = losses
        rec["rows"].append(
            {
                "precision": precision,
                "seconds": round(time.perf_counter() - start, 1),
                "steps": result["global_step"],
                "loss_first": round(losses[0], 4),
                "loss_last": round(losses[-1], 4),
            }
        )
        rec.check(
            f"{precision}: all steps ran, loss finite",
            result["global_step"] == steps and all(map(math.isfinite, losses)),
        )
        last = result["last_checkpoint"]
    fp32, bf16 = curves["32-true"], curves["bf16-mixed"]
    step_gaps = [abs(a - b) / a for a, b in zip(fp32, bf16, strict=False)]
    window_gaps = [
        abs(a - b) / a for a, b in zip(_window_means(fp32, window), _window_means(bf16, window), strict=False)
    ]
    rec["loss_curves"] = {k: [round(v, 5) for v in c] for k, c in curves.items()}
    rec["bf16_vs_fp32_max_step_gap"] = round(max(step_gaps), 5)
    rec["bf16_vs_fp32_window_gaps"] = [round(g, 5) for g in window_gaps]
    rec.check(
        f"bf16-mixed loss within {BF16_LOSS_TOL:.0%} of fp32 (means of {window} steps)",
        max(window_gaps) <= BF16_LOSS_TOL,
        rec["bf16_vs_fp32_window_gaps"],
    )

    # the bf16 run's checkpoint, rebuilt on the device, samples in bf16
    module, _, _ = load_module(last, map_location=ctx.device, ema=True)
    module.eval()
    devices = {str(p.device) for p in module.parameters()}
    rec["reloaded_on"] = sorted(devices)
    on_device = {p.device.type for p in module.parameters()} == {torch.device(ctx.device).type}
    rec.check("load_module(map_location=device) returns the module there", on_device, sorted(devices))
    n = 4 if ctx.tiny else 16
    shape = (n, 3, ctx.image_size, ctx.image_size)
    device_type = "cuda" if ctx.cuda else "cpu"
    draws = {}
    with torch.no_grad():
        draws["fp32"] = sample(
            module.model, module.diffusion, shape, "dpm_solver", steps=20, seed=0, device=ctx.device
        )
        with torch.autocast(device_type, torch.bfloat16):
            draws["bf16 autocast"] = sample(
                module.model, module.diffusion, shape, "dpm_solver", steps=20, seed=0, device=ctx.device
            )
        draws["bf16 weights"] = sample(
            CastModel(module.model, torch.bfloat16),
            module.diffusion,
            shape,
            "dpm_solver",
            steps=20,
            seed=0,
            device=ctx.device,
        )
    ref = draws["fp32"].float()
    rec["samples"] = {}
    for name, x in draws.items():
        x = x.float()
        ok = bool(torch.isfinite(x).all()) and x.abs().max().item() <= 1.0001
        rms = ((x - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()
        rec["samples"][name] = {"finite_in_range": ok, "rms_gap_to_fp32": round(rms, 4)}
        rec.check(f"reloaded model samples ({name}): finite, in [-1, 1]", ok)
