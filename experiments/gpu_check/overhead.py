"""The real ``train()`` path against the bare compiled step of the same model and batch: the gap is what the
framework costs (Lightning's loop, the loader and its host-to-device copy, the callbacks, logging).

``train()`` runs ``experiment=cifar10_ddpm`` as ``trainer=gpu`` sets it up (bf16-mixed, channels_last,
torch.compile) on the bundled digits as 3x32x32 images, with a step timer (``instrument.StepTimer``) timing
windows of steps as the other rows are timed; each window holds one logging step. Then the same compiled
module (no second compile: TorchDynamo's cache holds its graphs) steps alone on a device-resident batch with
the module's own optimizer, clipping and autocast. Where the time left allows, the bare step once more with
``compile=reduce-overhead`` (CUDA graphs), on a fresh build.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch

from experiments.gpu_check.common import (
    Ctx,
    Record,
    compose_run_config,
    optimizer_of,
    time_steps,
    toy_compile,
)
from experiments.gpu_check.speed import Setup, optimizer_step_fn, timed_row, train_flops

__all__ = ["run_overhead"]


def _bare_step(ctx: Ctx, module, cfg):
    """One optimizer step of ``module`` (already compiled) as Lightning runs it, on a fixed batch."""
    module.to(ctx.device).train()  # Lightning's teardown moved it to the CPU; the compiled graphs stay valid
    opt = optimizer_of(module)
    b, s = ctx.batch, ctx.image_size
    x0 = torch.rand(b, 3, s, s, device=module.device) * 2 - 1  # NCHW, as the loader delivers it
    return optimizer_step_fn(module, opt, cfg, x0, "bf16" in str(cfg.trainer.precision)), opt


def run_overhead(ctx: Ctx, rec: Record) -> None:
    from diffusion_lab.train import train
    from experiments.gpu_check import instrument

    timing = ctx.timing()
    window = 2 if ctx.tiny else 25  # steps per timed window = trainer.log_every_n_steps: one log step each
    repeats = timing["repeats"]
    warmup = timing["warmup"] if ctx.tiny else 10
    steps = 1 + warmup + repeats * window + 1
    target = "experiments.gpu_check.instrument.StepTimer"
    overrides = (
        ctx.base_overrides()
        + ctx.model_overrides("unet_cifar")
        + [
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0",
            f"trainer.log_every_n_steps={window}",
            "callbacks.sample_grid=null",
            "callbacks.best_checkpoint=null",
            "callbacks.model_checkpoint=null",  # no 0.6 GB writes in the timing
            f"+callbacks.step_timer._target_={target}",
            f"+callbacks.step_timer.warmup={warmup}",
            f"+callbacks.step_timer.steps={window}",
            f"+callbacks.step_timer.repeats={repeats}",
        ]
    )
    run_dir = ctx.work / "overhead"
    cfg = compose_run_config(ctx, overrides, run_dir)
    rec.update(
        model="unet_cifar",
        batch=ctx.batch,
        precision=str(cfg.trainer.precision),
        channels_last=bool(cfg.channels_last),
        compile=cfg.compile,
        steps=steps,
        window=window,
        rows=[],
    )
    instrument.INSTANCES.clear()
    start = time.perf_counter()
    with toy_compile(ctx):
        result = train(cfg)
    rec["train_seconds"] = round(time.perf_counter() - start, 1)
    rec.check("all steps ran", result["global_step"] == steps, result["global_step"])
    timer = next(cb for cb in instrument.INSTANCES if isinstance(cb, instrument.StepTimer))
    module = timer.module
    # FLOPs of a fresh, uncompiled build (the compiled one would compile again for the counter's batch)
    flops, _ = train_flops(ctx, cfg)
    rec["gflop_per_image_train"] = round(flops / 1e9, 3)
    clock = "device_s" if ctx.cuda else "host_s"
    ms = [1000 * w[clock] / w["steps"] for w in timer.windows]
    host = [1000 * w["host_s"] / w["steps"] for w in timer.windows]
    row = {
        "setup": "train() (trainer=gpu: Lightning, loader, callbacks, a log step per window)",
        "first_step_s": timer.first_step_s,
        "ms_per_step": round(statistics.median(ms), 3),
        "ms_repeats": [round(v, 3) for v in ms],
        "ms_host_repeats": [round(v, 3) for v in host],
        "syncs_in_timed_loop": sum(w.get("syncs", 0) for w in timer.windows),
        "sync_sites": dict(sum((Counter(w.get("sync_sites", {})) for w in timer.windows), Counter())),
        "log_steps_in_timed_loop": repeats,
        **timer.memory,
    }
    if ctx.cuda:
        gap = abs(statistics.median(host) - statistics.median(ms)) / statistics.median(ms)
        row["clock_gap_pct"], row["clocks_disagree"] = round(100 * gap, 2), gap > 0.03
    rec["rows"].append(row)
    rec.save()

    # the same compiled module, stepping alone
    from torch._dynamo.utils import counters

    step, opt = _bare_step(ctx, module, cfg)
    graphs = counters["stats"]["unique_graphs"]
    bare = {
        "setup": "bare compiled step (same module, batch on the device)",
        "fused_adamw": bool(opt.defaults.get("fused")),
    }
    bare.update(time_steps(step, ctx, **timing))
    bare["graphs_compiled_again"] = counters["stats"]["unique_graphs"] - graphs
    rec["rows"].append(bare)
    for r in rec["rows"]:
        ips = ctx.batch / (r["ms_per_step"] / 1000)
        r["images_per_s"] = round(ips, 1)
        r["achieved_tflops"] = round(ips * flops / 1e12, 4)
        r["bf16"] = True
    rec["framework_overhead_pct"] = round(100 * (row["ms_per_step"] / bare["ms_per_step"] - 1), 1)
    rec.save()
    del module, step, opt, timer
    instrument.INSTANCES.clear()
    torch._dynamo.reset()

    # CUDA graphs: the bare step compiled with mode="reduce-overhead" (a fresh build and compile)
    need = 20 if ctx.tiny else 90
    if ctx.left() < need:
        rec["rows"].append(
            {
                "setup": "bare step, compile=reduce-overhead",
                "skipped": f"time budget ({ctx.left():.0f} s left, ~{need} s needed)",
            }
        )
        rec.save()
        return
    setup = Setup("bare step, compile=reduce-overhead", bf16=True, channels_last=True, compile=True)
    cg = timed_row(ctx, cfg, setup, flops, compile_mode="reduce-overhead")
    cg.pop("_step")
    rec["rows"].append(cg)
    rec.check("reduce-overhead: finite loss", cg["loss_finite"])
