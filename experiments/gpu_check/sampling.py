"""Sampling images/s of DDPM's CIFAR-10 U-Net (random weights: the speed does not depend on them) in every
precision, one dtype and one layout per row: fp32 (TF32 convolutions and matmuls), bf16 autocast (fp32
weights, a cast per op), bf16 weights (the network cast to bf16: ``Pipeline.to(dtype=torch.bfloat16)``,
``load(..., dtype=)``), each in NCHW, and bf16 weights in NHWC. DPM-Solver++(2M) 20 steps (Lu et al. 2022b,
Algorithm 2) at batch 256, each row timed as every row of the check (three repeats of one sampling call of 20
network evaluations); Heun 18 steps with churn (Karras et al. 2022, Algorithm 2; S_churn=2 as
experiment=hoda32_uncond) in fp32 and bf16 weights where the time left allows. The samples of each row against
the fp32 ones of the same seed: the relative RMS gap. And the FID plumbing on the device (classifier
features, and Inception where torch-fidelity and its weights are here)."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from experiments.gpu_check.common import Ctx, Record, compose_run_config, time_steps
from experiments.gpu_check.roundtrip import CastModel

__all__ = ["PRECISIONS", "SAMPLERS", "run_sampling", "run_fid", "inception_weights", "expected_nfe"]

# name -> (sampler, steps, keywords); network evaluations: DPM-Solver++(2M) one per step, Heun 2 steps - 1
SAMPLERS = {
    "DPM-Solver++(2M) 20": ("dpm_solver", 20, {}),
    "Heun 18, S_churn=2": ("heun", 18, {"S_churn": 2.0}),
}
TINY_STEPS = {"dpm_solver": 4, "heun": 3}  # --tiny: the same samplers, fewer steps
# name -> (autocast bf16, weights dtype, channels_last)
PRECISIONS = {
    "fp32": (False, torch.float32, False),
    "bf16 autocast": (True, torch.float32, False),
    "bf16 weights": (False, torch.bfloat16, False),
    "bf16 weights, NHWC": (False, torch.bfloat16, True),
}


def expected_nfe(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def _unet_cifar(ctx: Ctx, run_dir: Path):
    from diffusion_lab.training.build import build_module

    cfg = compose_run_config(ctx, ctx.base_overrides() + ctx.model_overrides("unet_cifar"), run_dir)
    torch.manual_seed(0)
    module, _ = build_module(cfg, (3, ctx.image_size, ctx.image_size), 10)
    return module.to(ctx.device).eval()


def run_sampling(ctx: Ctx, rec: Record) -> None:
    from diffusion_lab.samplers import sample

    if ctx.cuda:
        torch.backends.cudnn.benchmark = True
    module = _unet_cifar(ctx, ctx.work / "sampling")
    batch = 4 if ctx.tiny else 256
    shape = (batch, 3, ctx.image_size, ctx.image_size)
    rec.update(batch=batch, image_size=ctx.image_size, model="unet_cifar (random weights)", rows=[])
    device_type = "cuda" if ctx.cuda else "cpu"
    reference: dict[str, torch.Tensor] = {}
    for name, (sampler, steps, kw) in SAMPLERS.items():
        steps = TINY_STEPS[sampler] if ctx.tiny else steps
        nfe = expected_nfe(sampler, steps)
        for precision, (autocast, dtype, channels_last) in PRECISIONS.items():
            label = f"{name} {precision}"
            if sampler == "heun" and precision not in ("fp32", "bf16 weights"):
                continue
            need = 10 if ctx.tiny else 25
            if ctx.left() < need:
                rec["rows"].append(
                    {
                        "sampler": name,
                        "precision": precision,
                        "skipped": f"time budget ({ctx.left():.0f} s left)",
                    }
                )
                rec.save()
                continue
            net = copy.deepcopy(module.model)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
            model_fn = net if dtype == torch.float32 else CastModel(net, dtype)
            out = {}

            def run(model_fn=model_fn, sampler=sampler, steps=steps, kw=kw, autocast=autocast, out=out):
                with torch.no_grad(), torch.autocast(device_type, torch.bfloat16, enabled=autocast):
                    out["x"], out["nfe"] = sample(
                        model_fn,
                        module.diffusion,
                        shape,
                        sampler=sampler,
                        steps=steps,
                        seed=0,
                        device=ctx.device,
                        return_nfe=True,
                        **kw,
                    )

            timing = (
                {"warmup": 0, "steps": 1, "repeats": 2}
                if ctx.tiny
                else {"warmup": 1, "steps": 1, "repeats": 3}
            )
            row = {"sampler": name if not ctx.tiny else f"{name} ({steps} steps)", "precision": precision}
            row.update(time_steps(run, ctx, **timing))
            x = out["x"].float()
            row["nfe"] = out["nfe"]
            row["images_per_s"] = round(batch / (row["ms_per_step"] / 1000), 1)
            row["seconds_per_batch"] = round(row["ms_per_step"] / 1000, 3)
            if precision == "fp32":
                reference[name] = x
            elif name in reference:
                ref = reference[name]
                row["rms_gap_to_fp32"] = round(
                    ((x - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item(), 4
                )
            rec["rows"].append(row)
            rec.check(f"{label}: {nfe} network evaluations", out["nfe"] == nfe, out["nfe"])
            rec.check(f"{label}: finite samples", bool(torch.isfinite(x).all()))
            print(f"  {label:<36} {row['images_per_s']:9.1f} img/s", flush=True)
            del net, model_fn


def inception_weights() -> Path | None:
    """torch-fidelity's InceptionV3 weights where this machine keeps them, or None."""
    name = "weights-inception-2015-12-05-6726825d.pth"
    env = os.environ.get("DIFFUSION_LAB_INCEPTION_WEIGHTS")
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints" / name
    for p in (Path(env) if env else None, hub):
        if p is not None and p.is_file():
            return p
    return None


def run_fid(ctx: Ctx, rec: Record) -> None:
    """A digit classifier trained for one epoch on the device, then FID / KID / IS / class histogram of its
    features: real half against real half (small) and noise images against real (large)."""
    from diffusion_lab.data import DiffusionDataModule
    from diffusion_lab.metrics import MetricSuite
    from diffusion_lab.metrics.train_classifier import train_classifier

    size = ctx.image_size
    dm = DiffusionDataModule(name="digits", image_size=size, channels=3, cache_dir=ctx.work / "cache")
    dm.prepare_data()
    x, y = dm.real_images("train")
    xt, yt = dm.real_images("val")
    start = time.perf_counter()
    clf, acc = train_classifier(x, y, xt, yt, epochs=1, seed=0, dataset="digits", device=ctx.device, log=None)
    rec["classifier_seconds"] = round(time.perf_counter() - start, 1)
    rec["classifier_accuracy_1_epoch"] = round(acc, 3)
    names = ["fid_classifier", "kid_classifier", "is_classifier", "class_histogram"]
    n = len(x) // 2
    real_a, real_b = x[:n], x[n : 2 * n]
    noise = torch.randint(0, 256, real_b.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    suite = MetricSuite(
        names,
        classifier=clf,
        device=ctx.device,
        kid_subset_size=min(1000, n),
        kid_subsets=10 if ctx.tiny else 50,
    )
    start = time.perf_counter()
    same = suite.compute(real_b, real=real_a, cache_key="digits-a")
    other = suite.compute(noise, real=real_a, cache_key="digits-a")
    rec["metric_seconds"] = round(time.perf_counter() - start, 2)
    rec["device_of_features"] = str(next(suite.extractor("classifier").parameters()).device)
    rec["fid_classifier_real_vs_real"] = round(float(same["fid_classifier"]), 3)
    rec["fid_classifier_noise_vs_real"] = round(float(other["fid_classifier"]), 3)
    rec["is_classifier_real"] = round(float(same["is_classifier"]), 3)
    rec.check(
        "FID finite",
        all(
            map(torch.isfinite, (torch.tensor(same["fid_classifier"]), torch.tensor(other["fid_classifier"])))
        ),
    )
    rec.check("FID(real, real) < FID(noise, real)", same["fid_classifier"] < other["fid_classifier"])
    rec.check("features on the device", rec["device_of_features"].startswith(ctx.device.split(":")[0]))
    weights = inception_weights()
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        weights_ok = False
        why = "torch-fidelity is not installed"
    else:
        weights_ok = weights is not None
        why = (
            "no InceptionV3 weights here "
            "(set DIFFUSION_LAB_INCEPTION_WEIGHTS or put them in torch's hub cache)"
        )
    if not weights_ok:
        rec["inception"] = f"skipped: {why}"
        print(f"  Inception FID skipped: {why}", flush=True)
        return
    m = 64 if ctx.tiny else 500
    suite = MetricSuite(["fid_inception"], inception_weights=weights, device=ctx.device)
    start = time.perf_counter()
    r = suite.compute(x[m : 2 * m], real=x[:m], cache_key="digits-inception")
    rec["inception"] = {
        "fid_inception_real_vs_real": round(float(r["fid_inception"]), 3),
        "n": m,
        "seconds": round(time.perf_counter() - start, 1),
    }
    rec.check("Inception FID finite", bool(torch.isfinite(torch.tensor(r["fid_inception"]))))
