"""Is data loading ever the bottleneck? Loader images/s against the training step it feeds."""

from __future__ import annotations

import time
from pathlib import Path

from diffusion_lab.data import DiffusionDataModule
from experiments.bench.setups import TrainSetup, train_step
from experiments.bench.timing import interleave

__all__ = ["run_loader"]


def _loader_rate(dm: DiffusionDataModule, seconds: float) -> float:
    dm.prepare_data()
    dm.setup("fit")
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x, _ in dm.train_dataloader():
            n += x.shape[0]
            if time.perf_counter() - start >= seconds:
                break
    return n / (time.perf_counter() - start)


def run_loader(hoda: str | None, cache_dir: str | None, seconds: float, log=print) -> list[dict]:
    cases = [("digits", dict(name="digits", image_size=16, batch_size=64), 16, 64)]
    if hoda and Path(hoda).is_dir():
        cases.append(("persian", dict(name="persian", root=hoda, image_size=32, batch_size=128), 32, 128))
    rows = []
    for label, kw, size, batch in cases:
        loader = _loader_rate(DiffusionDataModule(cache_dir=cache_dir, **kw), seconds)
        step, _ = train_step("unet_tiny", size, TrainSetup(bf16=True, batch=batch))
        train = interleave({"step": step}, seconds, 1)["step"]["ips"]
        rows.append(
            {
                "dataset": f"{label} {size}x{size}",
                "loader_images_per_s": round(loader),
                "train_images_per_s": round(train, 1),
                "ratio": round(loader / train),
            }
        )
        log(
            f"  {label} {size}px: loader {loader:,.0f} img/s, bf16 training step {train:,.1f} img/s "
            f"({loader / train:,.0f}x)"
        )
    return rows
