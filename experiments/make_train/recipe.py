"""Which sampler draws clean grids for `make train`: the share of unplaceable digits per sampler and seed.

For each checkpoint and each sampler (a Hydra `sampler` group option plus overrides), draw 64 samples
with each seed and count those the digits classifier cannot place (max softmax < 0.5), as `make train`'s
final grid would show them. One row per (checkpoint, sampler): the count for each seed, the total, the NFE
and the seconds per grid.

    python -m experiments.make_train.recipe --ckpt RUN/checkpoints/last.ckpt [--ckpt ...] \\
        --classifier PATH --seeds 1234 1 2 --out experiments/make_train/results.json

The classifier is the project's digit classifier trained on the same 16x16 digits
(`python -m diffusion_lab.metrics.train_classifier dataset=digits metrics.classifier_path=PATH`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion_lab.metrics.classifier import load_classifier
from diffusion_lab.sample import generate
from diffusion_lab.train import CONF_DIR
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.utils.checkpoint_sampler import given_options

# (label, sampler group option, overrides): the training default and the stochastic alternatives.
SAMPLERS = [
    ("dpm_solver++ 20 (logsnr)", "dpm_solver", []),
    ("heun 18 karras", "heun", []),
    ("heun 18 karras, S_churn 2", "heun", ["sampler.S_churn=2"]),
    ("heun 18 karras, S_churn 10", "heun", ["sampler.S_churn=10"]),
    ("euler 50 karras, S_churn 40", "euler", ["sampler.steps=50", "sampler.S_churn=40"]),
    ("ddim 50, eta 1", "ddim", ["sampler.eta=1.0"]),
    ("ddpm ancestral 100", "ddpm", ["sampler.steps=100"]),
    ("ddpm ancestral 100, trailing", "ddpm", ["sampler.steps=100", "sampler.grid=trailing"]),
    ("ddpm ancestral 50, trailing", "ddpm", ["sampler.steps=50", "sampler.grid=trailing"]),
    ("ddpm ancestral 250", "ddpm", ["sampler.steps=250"]),
    ("ddpm ancestral 1000", "ddpm", []),
]
CONFIDENT = 0.5


def sampler_from(option: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt=unused", f"sampler={option}", *overrides])
    return instantiate(given_options(cfg.sampler))  # without the unset keys of conf/sampler_options.yaml


@torch.no_grad()
def unplaced(classifier, images: torch.Tensor) -> int:
    """Samples whose most likely class has probability < 0.5 under the digits classifier."""
    probs = classifier(images.float() / 127.5 - 1.0).softmax(-1)  # uint8 -> [-1, 1]
    return int((probs.max(-1).values < CONFIDENT).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", action="append", required=True)
    p.add_argument("--classifier", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--only", nargs="*", default=None, help="sampler labels to run (default: all)")
    p.add_argument("--out", default="experiments/make_train/results.json")
    args = p.parse_args()
    classifier = load_classifier(args.classifier).eval()
    rows = []
    for ckpt in args.ckpt:
        module, cfg, _ = load_module(ckpt)
        recipe = f"{cfg.objective.get('parameterization', cfg.objective._target_.rsplit('.', 1)[-1])}"
        recipe += f" / {cfg.schedule.get('name', '?')}"
        for label, option, overrides in SAMPLERS:
            if args.only and label not in args.only:
                continue
            sampler = sampler_from(option, overrides)
            counts, t0 = [], time.perf_counter()
            for seed in args.seeds:
                images, _, nfe = generate(module, sampler, n=args.n, seed=seed, batch_size=args.n)
                counts.append(unplaced(classifier, images))
            seconds = (time.perf_counter() - t0) / len(args.seeds)
            row = {
                "ckpt": ckpt,
                "recipe": recipe,
                "sampler": label,
                "nfe": nfe,
                "unplaced": counts,
                "total": sum(counts),
                "seconds_per_grid": round(seconds, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
