"""Sampler comparison on one checkpoint: classifier-feature FID and wall time against network evaluations.

    python -m experiments.sampler_comparison --ckpt outputs/persian_sampler_study/runs/.../last.ckpt \
        --data-root /path/to/hoda --n 1000

For DDPM (1000, 250, 100 steps), DDIM (100, 50, 20, 10; eta = 0) and DPM-Solver++(2M) (25, 20, 10) it draws
the same number of samples from the EMA weights with the same seeds, scores them against the checkpoint's
real test split and writes ``results.json``, ``table.md`` and ``fid_vs_nfe.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from diffusion_lab.checkpoint import load_module
from diffusion_lab.metrics import MetricSuite
from diffusion_lab.sample import generate
from diffusion_lab.samplers import get_sampler

CONFIGS = [
    ("ddpm", 1000),
    ("ddpm", 250),
    ("ddpm", 100),
    ("ddim", 100),
    ("ddim", 50),
    ("ddim", 20),
    ("ddim", 10),
    ("dpm_solver", 25),
    ("dpm_solver", 20),
    ("dpm_solver", 10),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data-root", default=None, help="where the checkpoint's dataset lives now")
    p.add_argument("--n", type=int, default=1000, help="samples per sampler setting")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument(
        "--classifier", default=None, help="digit classifier (default: the run's metrics.classifier_path)"
    )
    p.add_argument("--out", default="experiments/sampler_comparison")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="*", default=None, help="subset, e.g. ddim:10 dpm_solver:20")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    module, cfg, ckpt = load_module(args.ckpt)
    with open_dict(cfg):
        if args.data_root:
            cfg.dataset.root = args.data_root
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    suite = MetricSuite(
        ["fid_classifier", "kid_classifier", "class_histogram"],
        classifier=args.classifier or cfg.metrics.classifier_path,
        cache_dir=cfg.metrics.cache_dir,
    )
    real = dm.real_images("test")[0]
    key = f"{dm.name}-test-{dm.image_size}px-{dm.channels}ch-nall"
    suite.compute(real[:100], real=real, cache_key=key)  # real statistics once, outside the timings

    rows = []
    configs = CONFIGS if not args.only else [(s.split(":")[0], int(s.split(":")[1])) for s in args.only]
    for name, steps in configs:
        sampler = partial(get_sampler(name), steps=steps)
        start = time.perf_counter()
        fake, _, nfe = generate(module, sampler, args.n, seed=0, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        scores = suite.compute(fake, cache_key=key)
        hist = scores.pop("class_histogram").tolist()
        row = {
            "sampler": name,
            "steps": steps,
            "nfe": nfe,
            "fid_classifier": scores["fid_classifier"],
            "kid_classifier": scores["kid_classifier"],
            "class_entropy": scores["class_entropy"],
            "seconds": round(seconds, 1),
            "seconds_per_1k": round(1000 * seconds / args.n, 1),
            "class_histogram": hist,
        }
        rows.append(row)
        print(
            f"{name:>10} {steps:>5} steps  NFE {nfe:>5}  FID(classifier) {row['fid_classifier']:8.3f}  "
            f"KID(classifier) {row['kid_classifier']:.4f}  {seconds:7.1f} s",
            flush=True,
        )

    meta = {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "global_step": ckpt.get("global_step"),
        "dataset": f"{dm.name} {dm.image_size}x{dm.image_size} (real: test split, {len(real)} images)",
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "schedule": cfg.schedule.name,
        "timesteps": cfg.schedule.timesteps,
        "objective": cfg.objective.parameterization,
        "n_samples": args.n,
        "hardware": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, CPU only",
        "torch": torch.__version__,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"Checkpoint: {meta['dataset']}, {meta['model']}, {meta['schedule']} schedule "
        f"(T = {meta['timesteps']}), "
        f"{meta['objective']} objective, EMA weights at step {meta['global_step']}. {args.n} samples per row "
        f"(seed 0). Hardware: {meta['hardware']}.",
        "",
        "| sampler | steps | NFE | FID (classifier features) | KID (classifier features) | class entropy | "
        "wall time (s) | s per 1k samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid_classifier']:.3f} | "
            f"{r['kid_classifier']:.4f} | {r['class_entropy']:.3f} | {r['seconds']} | {r['seconds_per_1k']} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "fid_vs_nfe.png")
    print("\n".join(lines))


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, marker in (("ddpm", "o"), ("ddim", "s"), ("dpm_solver", "^")):
        pts = sorted((r["nfe"], r["fid_classifier"]) for r in rows if r["sampler"] == name)
        if pts:
            ax.plot(
                *zip(*pts), marker=marker, label={"dpm_solver": "DPM-Solver++(2M)"}.get(name, name.upper())
            )
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FID (classifier features)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
