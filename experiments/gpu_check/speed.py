"""Training images/s of one optimizer step, and the model FLOP utilisation (MFU) against the matmul peak.

The step is the project's own: the module is built from the composed run config as ``train()`` builds it
(:func:`~diffusion_lab.training.build.build_module`), the optimizer is the module's (``configure_optimizers``:
its fused switch), and one step is what Lightning runs for ``DiffusionModule.training_step`` under
``trainer.precision``: autocast around the loss only (with Lightning's ``cache_enabled=False``: a compiled
graph guards on it), backward, gradient clipping at
``trainer.gradient_clip_val``, the optimizer step. The batch stays on the device, t and eps are drawn there
(no loader in the timing). FLOPs per image: the forward pass counted by ``FlopCounterMode`` times 3 (backward
~ 2x forward), the usual MFU convention (Chowdhery et al. 2022, App. B).

``eager_unet_cifar``: unet_cifar eager in {fp32, bf16} x {NCHW, NHWC}, the bf16 rows with torch's autocast
rule for GroupNorm (fp32: a cast and, from NHWC, a copy to NCHW per norm on CUDA) and with the U-Net's
GroupNorm in bf16; then the profiler over the bf16 rows, in runs of their own.
``dit``: DiT-S/2 and DiT-B/2 compiled, bf16-mixed.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.gpu_check.common import (
    Ctx,
    Record,
    compose_run_config,
    optimizer_of,
    profile_steps,
    time_steps,
    toy_compile,
)

__all__ = [
    "EAGER_SETUPS",
    "Setup",
    "forward_flops",
    "train_flops",
    "timed_row",
    "run_eager",
    "run_dit",
    "build_step",
    "DIT_MODELS",
]

DIT_MODELS = ("dit_s2", "dit_b2")
# eager rows profiled (where the bf16 step's time goes with each norm and layout)
PROFILED = ("bf16 NHWC, fp32 norm", "bf16 NHWC, bf16 norm", "bf16 NCHW, bf16 norm")


@dataclass(frozen=True)
class Setup:
    """One way of running the step: bf16-mixed autocast, NHWC, GroupNorm in fp32 under autocast
    (``UNet(fp32_norm=True)``, torch's rule), torch.compile."""

    name: str
    bf16: bool
    channels_last: bool = False
    fp32_norm: bool = False
    compile: bool = False


EAGER_SETUPS = (
    Setup("fp32 NCHW", bf16=False),
    Setup("fp32 NHWC", bf16=False, channels_last=True),
    Setup("bf16 NCHW, fp32 norm", bf16=True, fp32_norm=True),
    Setup("bf16 NHWC, fp32 norm", bf16=True, channels_last=True, fp32_norm=True),
    Setup("bf16 NCHW, bf16 norm", bf16=True),
    Setup("bf16 NHWC, bf16 norm", bf16=True, channels_last=True),
)


def forward_flops(model: torch.nn.Module, shape: tuple[int, int, int], device: str) -> float:
    """FLOPs of one image's forward pass (batch 2, fp32, no grad), counted by ``FlopCounterMode``."""
    x = torch.randn(2, *shape, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops() / 2


def build_step(ctx: Ctx, cfg, setup: Setup, compile_mode: str | bool | None = None):
    """(module, step, optimizer): the run config's module on the device with ``setup``'s switches, and one
    optimizer step on a fixed device-resident batch (t and eps drawn on the device)."""
    from diffusion_lab.models.unet import GroupNorm
    from diffusion_lab.training.build import build_module, speed_up

    torch.manual_seed(0)
    module, _ = build_module(cfg, (3, ctx.image_size, ctx.image_size), 10, training=False)
    for m in module.model.modules():
        if isinstance(m, GroupNorm):
            m.autocast_fp32 = setup.fp32_norm
    module = module.to(ctx.device)
    with toy_compile(ctx):
        speed_up(module.model, setup.channels_last, (compile_mode or True) if setup.compile else False)
    opt = optimizer_of(module)
    b, s = ctx.batch, ctx.image_size
    x0 = torch.rand(b, 3, s, s, device=ctx.device) * 2 - 1
    if setup.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    return module, optimizer_step_fn(module, opt, cfg, x0, setup.bf16), opt


def optimizer_step_fn(module, opt, cfg, x0: torch.Tensor, bf16: bool):
    """``step() -> loss``: one optimizer step of ``module`` on the fixed batch ``x0`` as Lightning runs it
    (bf16 autocast without its weight cache, as Lightning's, the run's gradient clipping, ``opt.step()``)."""
    model, diffusion = module.model, module.diffusion
    clip = float(cfg.trainer.gradient_clip_val or 0.0) or float("inf")
    params = [p for p in model.parameters() if p.requires_grad]
    b, device_type = x0.shape[0], x0.device.type

    def step() -> torch.Tensor:
        t = diffusion.sample_timesteps(b, device=x0.device)
        eps = torch.randn_like(x0)
        with torch.autocast(device_type, torch.bfloat16, enabled=bf16, cache_enabled=False):
            loss = diffusion.training_losses(model, x0, t=t, eps=eps)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss

    return step


def timed_row(ctx: Ctx, cfg, setup: Setup, flops: float, compile_mode=None) -> dict:
    """One row: build, time (common.time_steps), images/s, TFLOP/s, the optimizer's fused switch."""
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    module, step, opt = build_step(ctx, cfg, setup, compile_mode)
    losses = []
    row = {
        "setup": setup.name,
        "bf16": setup.bf16,
        "channels_last": setup.channels_last,
        "fp32_norm": setup.fp32_norm,
        "compile": (compile_mode or "default") if setup.compile else False,
        "fused_adamw": bool(opt.defaults.get("fused")),
    }
    row.update(time_steps(lambda: losses.append(step()), ctx, **ctx.timing()))
    ips = ctx.batch / (row["ms_per_step"] / 1000)
    row["images_per_s"] = round(ips, 1)
    row["achieved_tflops"] = round(ips * flops / 1e12, 4)
    row["loss_finite"] = bool(torch.isfinite(torch.stack(losses[-3:])).all().item())
    row["_step"] = step  # for a profiler run; dropped before the record is saved
    return row


def _compose(ctx: Ctx, model: str, name: str):
    return compose_run_config(
        ctx, ctx.base_overrides() + [f"model={model}"] + ctx.model_overrides(model), ctx.work / name
    )


def train_flops(ctx: Ctx, cfg) -> tuple[float, int]:
    from diffusion_lab.training.build import build_module

    module, n_params = build_module(cfg, (3, ctx.image_size, ctx.image_size), 10)
    flops = 3 * forward_flops(module.model.to(ctx.device), (3, ctx.image_size, ctx.image_size), ctx.device)
    return flops, n_params


def run_eager(ctx: Ctx, rec: Record) -> None:
    """unet_cifar eager: the six setups; the profiler over three bf16 rows, each after its timing."""
    cfg = _compose(ctx, "unet_cifar", "eager_unet_cifar")
    if ctx.cuda:
        torch.backends.cudnn.benchmark = True  # trainer=gpu: benchmark: true
    flops, n_params = train_flops(ctx, cfg)
    rec.update(model="unet_cifar", batch=ctx.batch, image_size=ctx.image_size, parameters=n_params, rows=[])
    rec["gflop_per_image_train"] = round(flops / 1e9, 3)
    rec["timing"] = ctx.timing()
    rec.save()
    rec["profiles"] = {}
    for setup in EAGER_SETUPS:
        row = timed_row(ctx, cfg, setup, flops)
        step = row.pop("_step")
        rec["rows"].append(row)
        rec.check(f"finite loss ({setup.name})", row["loss_finite"])
        print(f"  unet_cifar {setup.name:<24} {row['images_per_s']:9.1f} img/s", flush=True)
        if setup.name in PROFILED:  # the profiler in a run of its own, after the timing, on the warm step
            if ctx.left() < 30:
                rec["profiles"][setup.name] = {"skipped": f"time budget ({ctx.left():.0f} s left)"}
            else:
                rec["profiles"][setup.name] = profile_steps(step, ctx, steps=1 if ctx.tiny else 3)
        del step  # the next row's memory counts its own model only
        rec.save()
    ref = rec["rows"][0]["images_per_s"]
    for row in rec["rows"]:
        row["vs_fp32_nchw"] = round(row["images_per_s"] / ref, 3)


def run_dit(ctx: Ctx, rec: Record) -> None:
    """DiT-S/2 and DiT-B/2, compiled (inductor's default mode), bf16-mixed; DiT-B/2 only when the time left
    covers its compile (about 60 s on an H100 / H200)."""
    rec.update(batch=ctx.batch, image_size=ctx.image_size, rows=[])
    for model in DIT_MODELS:
        need = 20 if ctx.tiny else 70
        if ctx.left() < need:
            rec["rows"].append(
                {"model": model, "skipped": f"time budget ({ctx.left():.0f} s left, ~{need} s needed)"}
            )
            rec.save()
            continue
        cfg = _compose(ctx, model, model)
        flops, n_params = train_flops(ctx, cfg)
        row = timed_row(ctx, cfg, Setup(f"{model} compiled bf16", bf16=True, compile=True), flops)
        row.pop("_step")
        row.update(model=model, parameters=n_params, gflop_per_image_train=round(flops / 1e9, 3))
        rec["rows"].append(row)
        rec.check(f"finite loss ({model})", row["loss_finite"])
        print(f"  {model} compiled bf16 {row['images_per_s']:9.1f} img/s", flush=True)
        torch._dynamo.reset()
