"""Benchmarks (`make bench`): is data loading ever the bottleneck, and what does a sampler step cost?

    python -m experiments.bench [--hoda /path/to/hoda] [--seconds 5] [--threads N]

Every number is printed beside a reference measured in the same run:
- loader images/s against the training step's images/s of the model that trains on it (ratio >> 1: the
  loader is not the bottleneck);
- DDIM-50 and DPM-Solver++-20 wall time against DDPM's 1000 steps on the same network.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from diffusion_lab.data import DiffusionDataModule
from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.models import UNet
from diffusion_lab.samplers import sample
from diffusion_lab.schedules import make_schedule

UNET_TINY = dict(channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[8])


def loader_rate(dm: DiffusionDataModule, seconds: float) -> float:
    dm.prepare_data()
    dm.setup("fit")
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x, _ in dm.train_dataloader():
            n += x.shape[0]
            if time.perf_counter() - start >= seconds:
                break
    return n / (time.perf_counter() - start)


def train_rate(image_size: int, batch: int, seconds: float) -> float:
    model = UNet(in_channels=1, out_channels=1, image_size=image_size, **UNET_TINY)
    d = GaussianDiffusion(make_schedule("linear", 1000))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 1, image_size, image_size) * 2 - 1

    def step() -> None:
        loss = d.training_losses(model, x0)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up, not timed
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - start)


def sampler_times(image_size: int, n: int) -> dict[str, float]:
    model = UNet(in_channels=1, out_channels=1, image_size=image_size, **UNET_TINY).eval()
    d = GaussianDiffusion(make_schedule("linear", 1000))
    out = {}
    for name, steps in (("ddpm", None), ("ddim", 50), ("dpm_solver", 20)):
        start = time.perf_counter()
        with torch.no_grad():
            sample(model, d, (n, 1, image_size, image_size), sampler=name, steps=steps, seed=0)
        out[name] = time.perf_counter() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_hoda = Path(os.environ.get("DIFFUSION_LAB_SHARED_DATA", "../shared/data")) / "hoda"
    p.add_argument("--hoda", default=str(default_hoda))
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n== loader vs training step (images/s; ratio = loader / training) ==")
    cases = [("digits 16x16", dict(name="digits", image_size=16, batch_size=64), 16, 64)]
    if Path(args.hoda).is_dir():
        cases.append(
            ("persian 32x32", dict(name="persian", root=args.hoda, image_size=32, batch_size=64), 32, 64)
        )
    else:
        print(f"(persian skipped: no Hoda files at {args.hoda})")
    for label, kw, size, batch in cases:
        dm = DiffusionDataModule(cache_dir=args.cache_dir, **kw)
        lr = loader_rate(dm, args.seconds)
        tr = train_rate(size, batch, args.seconds)
        print(f"{label:>14}: loader {lr:12,.0f}   unet_tiny train step {tr:8,.0f}   ratio {lr / tr:8.0f}x")
    print("\n== samplers on unet_tiny, 64 samples of 16x16 (ratio = DDPM-1000 time / this) ==")
    times = sampler_times(16, 64)
    for name, t in times.items():
        print(f"{name:>10}: {t:7.2f} s   speed-up vs ddpm {times['ddpm'] / t:6.1f}x")


if __name__ == "__main__":
    main()
