"""Training images/s of one backbone: plain fp32 eager against trainer=gpu's switches, and the model FLOP
utilisation (MFU) against the matmul peak of the same run.

The step is the project's own: the module is built from the composed run config as ``train()`` builds it
(:func:`~diffusion_lab.training.build.build_module`), and one step is what Lightning runs for
``DiffusionModule.training_step`` under ``trainer.precision``: autocast around the loss only, backward,
gradient clipping at ``trainer.gradient_clip_val``, the optimizer step. The batch, t and eps stay on the
device (no loader in the timing). FLOPs per image: the forward pass counted by ``FlopCounterMode`` times 3
(backward ~ 2x forward), the usual MFU convention (Chowdhery et al. 2022, App. B).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.gpu_check.common import Ctx, Record, compose_run_config, sync, timed

__all__ = ["SETUPS", "Setup", "dit_model_name", "run_speed"]

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


@dataclass(frozen=True)
class Setup:
    """One way of running the step: trainer.precision, channels_last, compile and AdamW's fused kernel."""

    name: str
    bf16: bool
    channels_last: bool
    compile: bool
    fused: bool


# trainer=gpu keeps torch's default (foreach) AdamW: Lightning refuses an optimizer that handles gradient
# unscaling itself (fused AdamW) together with gradient clipping under mixed precision. The fused kernel is
# timed on the same (compiled) model as a second row, to show what that refusal costs.
SETUPS = (
    Setup("fp32 eager", bf16=False, channels_last=False, compile=False, fused=False),
    Setup("bf16 eager", bf16=True, channels_last=True, compile=False, fused=False),
    Setup("trainer=gpu", bf16=True, channels_last=True, compile=True, fused=False),
)


def dit_model_name() -> str | None:
    """A DiT config of conf/model when ``diffusion_lab.models.dit`` exists (the smallest by name: dit_s*)."""
    import importlib.util

    if importlib.util.find_spec("diffusion_lab.models.dit") is None:
        return None
    names = sorted(p.stem for p in CONF_MODEL.glob("dit*.yaml"))
    small = [n for n in names if "_s" in n or n.endswith("s")]
    return (small or names or [None])[0]


def forward_flops(model: torch.nn.Module, shape: tuple[int, int, int], device: str) -> float:
    """FLOPs of one image's forward pass (batch 2, fp32, no grad), counted by ``FlopCounterMode``."""
    x = torch.randn(2, *shape, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops() / 2


def _build(cfg, ctx: Ctx, setup: Setup, channels_last_helps: bool):
    from diffusion_lab.training.build import build_module, speed_up

    torch.manual_seed(0)
    shape = (3, ctx.image_size, ctx.image_size)
    module, n_params = build_module(cfg, shape, 10, training=False)
    module = module.to(ctx.device)
    model = speed_up(module.model, setup.channels_last and channels_last_helps, setup.compile and ctx.compile)
    return module, model, _optimizer(module, model, setup.fused), n_params


def _optimizer(module, model, fused: bool):
    """The run config's optimizer (``conf/optimizer``), with AdamW's fused kernel when ``fused``."""
    return module.optimizer_factory(model.parameters(), **({"fused": True} if fused else {}))


def _step_fn(ctx: Ctx, module, model, opt, setup: Setup, channels_last: bool, clip: float):
    """One optimizer step on a fixed device-resident batch; t and eps drawn on the device."""
    diffusion = module.diffusion
    b, s = ctx.batch, ctx.image_size
    x0 = torch.rand(b, 3, s, s, device=ctx.device) * 2 - 1
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    device_type = "cuda" if ctx.cuda else "cpu"
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        t = diffusion.sample_timesteps(b, device=x0.device)
        eps = torch.randn_like(x0)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=setup.bf16):
            loss = diffusion.training_losses(model, x0, t=t, eps=eps)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss

    return step


def run_speed(ctx: Ctx, rec: Record, model_name: str | None) -> None:
    if model_name is None:
        rec["status"] = "skipped"
        rec["reason"] = "no DiT in this tree (diffusion_lab.models.dit and conf/model/dit*.yaml)"
        return
    run_dir = ctx.work / f"speed_{model_name}"
    cfg = compose_run_config(
        ctx, ctx.base_overrides() + [f"model={model_name}"] + ctx.model_overrides(model_name), run_dir
    )
    clip = float(cfg.trainer.gradient_clip_val or 0.0) or float("inf")
    channels_last_helps = model_name.startswith("unet")  # NHWC only changes convolutions
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True  # trainer=gpu: benchmark: true
    warmup, steps = (1, 2) if ctx.tiny else (3, 20)
    rec.update(model=model_name, batch=ctx.batch, image_size=ctx.image_size, timed_steps=steps, rows=[])
    rec["channels_last_used"] = channels_last_helps

    eager, _, _, n_params = _build(cfg, ctx, SETUPS[0], channels_last_helps)
    rec["parameters"] = n_params
    flops = 3 * forward_flops(eager.model, (3, ctx.image_size, ctx.image_size), ctx.device)
    rec["gflop_per_image_train"] = round(flops / 1e9, 3)
    del eager
    rec.save()

    for setup in SETUPS:
        if setup.compile and not ctx.compile:
            rec["rows"].append(
                {"setup": setup.name, "skipped": "compile off on CPU --tiny (minutes of C++ build)"}
            )
            rec.save()
            continue
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        module, model, opt, _ = _build(cfg, ctx, setup, channels_last_helps)
        cl = setup.channels_last and channels_last_helps
        variants = [setup] + (
            [replace(setup, name=setup.name + " + fused AdamW", fused=True)] if setup.bf16 else []
        )
        for v in variants:
            if v.fused:
                opt = _optimizer(module, model, True)
            step = _step_fn(ctx, module, model, opt, v, cl, clip)
            start = time.perf_counter()
            loss = step()
            sync(ctx.device)
            first = time.perf_counter() - start
            for _ in range(warmup):
                loss = step()
            seconds = timed(step, ctx.device, steps)
            ips = ctx.batch / seconds
            row = {
                "setup": v.name,
                "bf16": v.bf16,
                "channels_last": cl,
                "compile": v.compile,
                "fused_adamw": v.fused,
                "images_per_s": round(ips, 1),
                "ms_per_step": round(1000 * seconds, 2),
                "achieved_tflops": round(ips * flops / 1e12, 4),
                "first_step_s": round(first, 1),
                "loss_finite": bool(torch.isfinite(loss).item()),
            }
            if ctx.cuda:
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rec["rows"].append(row)
            rec.check(f"finite loss ({v.name})", row["loss_finite"])
            print(f"  {model_name} {v.name:<28} {ips:9.1f} img/s  first step {first:.1f} s", flush=True)
        del module, model, opt, step
        if setup.compile:
            torch._dynamo.reset()
    ref = rec["rows"][0]["images_per_s"]
    for row in rec["rows"]:
        if "images_per_s" in row:
            row["vs_fp32_eager"] = round(row["images_per_s"] / ref, 2)
