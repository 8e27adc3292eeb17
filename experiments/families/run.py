"""Three families on one backbone: classifier-feature FID and class histograms against NFE for every sampler.

Train (same U-Net, batch, lr, EMA and 30 minutes of one core on Hoda digits at 32 px; see README.md here):

    python train.py experiment=hoda32_uncond dataset.root=/path/to/hoda threads=1     # DDPM family
    python train.py experiment=edm_hoda32 dataset.root=/path/to/hoda threads=1        # EDM
    python train.py experiment=flow_hoda32 dataset.root=/path/to/hoda threads=1       # flow matching
    python train.py experiment=flow_hoda32 objective=interpolant objective.path=gvp task_name=sit_gvp_hoda32 \
        dataset.root=/path/to/hoda threads=1                                          # SiT, GVP path

then score every checkpoint with every sampler at every NFE:

    python -m experiments.families.run --model ddpm=outputs/hoda32_uncond/runs/<run>/checkpoints/last.ckpt \
        --model edm=... --model flow=... --model sit_gvp=... --data-root /path/to/hoda --n 1000

Writes results.json (one row per model x sampler x NFE), table.md, fid_vs_nfe.png and one sample grid per
model and sampler (at the largest NFE) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from diffusion_lab.metrics import MetricSuite
from diffusion_lab.sample import generate
from diffusion_lab.samplers import get_sampler
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.utils.media import save_grid

SAMPLERS = ("heun", "euler", "ddim", "dpm_solver", "ddpm", "euler_maruyama")
GRID = {
    "heun": "karras",
    "euler": "karras",
    "ddim": "uniform",
    "dpm_solver": "logsnr_uniform",
    "ddpm": "uniform",
    "euler_maruyama": "time_uniform",
}


def steps_for(sampler: str, nfe: int) -> int:
    """Heun spends 2 steps - 1 evaluations; every other sampler one per step."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT, once per family")
    p.add_argument("--data-root", default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--nfe", nargs="+", type=int, default=[10, 20, 35, 50])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--classifier", default=None)
    p.add_argument("--out", default="experiments/families")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        module, cfg, _ = load_module(path)
        models[name] = (module, cfg)
    cfg = next(iter(models.values()))[1]
    with open_dict(cfg):
        if args.data_root:
            cfg.dataset.root = args.data_root
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    real = dm.real_images("test")[0]
    key = f"{dm.name}-test-{dm.image_size}px-{dm.channels}ch-nall"
    suite = MetricSuite(
        ["fid_classifier", "class_histogram"],
        classifier=args.classifier or cfg.metrics.classifier_path,
        cache_dir=cfg.metrics.cache_dir,
    )
    meta = {
        "n": args.n,
        "seed": args.seed,
        "models": {k: str(m[0].diffusion.extra_repr()) for k, m in models.items()},
    }
    g = torch.Generator().manual_seed(args.seed)
    ref = suite.compute(real[torch.randperm(len(real), generator=g)[: args.n]], real=real, cache_key=key)
    meta["reference_fid"] = ref["fid_classifier"]  # the floor at this sample size
    rows = []
    for m, (module, _) in models.items():
        for s in args.samplers:
            for nfe in args.nfe:
                steps = steps_for(s, nfe)
                sampler = partial(get_sampler(s), steps=steps, grid=GRID[s])
                start = time.perf_counter()
                fake, _, used = generate(module, sampler, args.n, seed=args.seed, batch_size=args.batch_size)
                scores = suite.compute(fake, cache_key=key)
                row = {
                    "model": m,
                    "sampler": s,
                    "nfe": used,
                    "fid_classifier": scores["fid_classifier"],
                    "class_histogram": scores["class_histogram"].tolist(),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                rows.append(row)
                print(
                    f"{m:>8} {s:>14} NFE {used:>4}  FID(classifier) {row['fid_classifier']:8.3f}", flush=True
                )
                if nfe == max(args.nfe):
                    save_grid(fake[:100], out / f"samples_{m}_{s}{steps}.png")
                (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| model | sampler | " + " | ".join(f"NFE {n}" for n in args.nfe) + " |"]
    lines.append("|---|---|" + "---|" * len(args.nfe))
    for m in models:
        for s in args.samplers:
            fids = [r["fid_classifier"] for r in rows if r["model"] == m and r["sampler"] == s]
            lines.append(f"| {m} | {s} | " + " | ".join(f"{f:.2f}" for f in fids) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        for s in args.samplers:
            pts = [(r["nfe"], r["fid_classifier"]) for r in rows if r["model"] == m and r["sampler"] == s]
            ax.plot(*zip(*pts, strict=True), marker="o", label=s)
        ax.set(title=m, xlabel="NFE", ylabel="FID (classifier features)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_nfe.png", dpi=120)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
