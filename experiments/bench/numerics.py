"""Does the fast path train the same model? The default run (digits 16x16, unet_tiny, linear schedule, eps,
batch 64, AdamW 5e-4, gradient clipping 1.0) for a few hundred steps in fp32 and on the fast path of this CPU
(bf16-mixed where it has bf16 units, else fp32 compiled with ``torch.compile``) from the same initial
weights, data order and noise, beside an fp32 run with another seed (the noise floor)."""

from __future__ import annotations

import statistics
import time

import torch

from diffusion_lab.data import DiffusionDataModule
from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from experiments.bench.setups import autocast, build_unet

__all__ = ["run_numerics"]


def _to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


def _train(
    x: torch.Tensor,
    diffusion: GaussianDiffusion,
    bf16: bool,
    seed: int,
    steps: int,
    batch: int,
    compile_: bool = False,
):
    torch.manual_seed(0)  # the same initial weights in every run
    model = build_unet("unet_tiny", x.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    # trains through a compiled wrapper; the plain module (same weights) is evaluated, so that the val-set
    # batches of other shapes do not recompile
    net = torch.compile(model) if compile_ else model
    g = torch.Generator().manual_seed(seed)  # data order, t and eps
    losses, start, first = [], time.perf_counter(), None
    for i in range(steps):
        if i == 1:
            first = time.perf_counter() - start  # compiles here when compiled
            start = time.perf_counter()
        x0 = x[torch.randint(0, len(x), (batch,), generator=g)]
        t = diffusion.sample_timesteps(batch, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        with autocast(bf16):
            loss = diffusion.training_losses(net, x0, t=t, eps=eps)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    seconds = {
        "first_step": round(first, 2),
        "per_step_after": round((time.perf_counter() - start) / (steps - 1), 4),
    }
    return model.eval(), losses, seconds


@torch.no_grad()
def _val_bpd(
    model, diffusion: GaussianDiffusion, x: torch.Tensor, draws: int, bf16: bool
) -> tuple[float, float]:
    """Mean and standard error of the unbiased bits/dim estimate over ``draws`` noise draws of the val set."""
    vals = []
    for d in range(draws):
        g = torch.Generator().manual_seed(10_000 + d)  # the same noise for every model
        with autocast(bf16):
            vals.append(diffusion.bpd_estimate(model, x, generator=g).float())
    v = torch.cat(vals)
    return v.mean().item(), (v.std() / len(v) ** 0.5).item()


def _windows(losses: list[float], width: int) -> list[float]:
    return [statistics.fmean(losses[i : i + width]) for i in range(0, len(losses) - width + 1, width)]


def run_numerics(
    steps: int = 300,
    batch: int = 64,
    window: int = 50,
    draws: int = 8,
    bf16_units: bool = True,
    log=print,
) -> dict:
    dm = DiffusionDataModule(name="digits", image_size=16, batch_size=batch, seed=0)
    dm.prepare_data()
    x_train = _to_float(dm.real_images("train")[0])
    x_val = _to_float(dm.real_images("val")[0])
    diffusion = GaussianDiffusion(make_schedule("linear", 1000), parameterization="eps")
    fast = "bf16-mixed" if bf16_units else "fp32 compiled"
    # name -> (bf16, seed, compile)
    runs = {
        "fp32": (False, 0, False),
        fast: (bf16_units, 0, not bf16_units),
        "fp32 seed 1": (False, 1, False),
    }
    out: dict = {"steps": steps, "batch": batch, "window": window, "val_images": len(x_val), "runs": {}}
    window = max(1, min(window, steps))
    out["window"] = window
    curves = {}
    for name, (bf16, seed, comp) in runs.items():
        model, losses, seconds = _train(x_train, diffusion, bf16, seed, steps, batch, comp)
        curves[name] = _windows(losses, window)
        bpd, se = _val_bpd(model, diffusion, x_val, draws, bf16=False)
        run = {
            "loss_windows": [round(v, 4) for v in curves[name]],
            "val_bpd_fp32_eval": [round(bpd, 3), round(se, 3)],
            "seconds": seconds,
        }
        if bf16:
            bpd16, se16 = _val_bpd(model, diffusion, x_val, draws, bf16=True)
            run["val_bpd_bf16_eval"] = [round(bpd16, 3), round(se16, 3)]
        out["runs"][name] = run
        log(f"  {name:<12} loss per {window} steps {run['loss_windows']}  val bpd {bpd:.3f} +- {se:.3f}")
    out["fast_path"] = fast
    diff = [abs(a - b) for a, b in zip(curves[fast], curves["fp32"])]
    floor = [abs(a - b) for a, b in zip(curves["fp32 seed 1"], curves["fp32"])]
    out["max_window_gap_fast_vs_fp32"] = round(max(diff), 4)
    out["max_window_gap_seed1_vs_seed0"] = round(max(floor), 4)
    log(f"  largest window gap: {fast} vs fp32 {max(diff):.4f}, fp32 seed 1 vs seed 0 {max(floor):.4f}")
    return out
