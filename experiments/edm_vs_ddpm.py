"""EDM against the DDPM family: classifier-feature FID and class histograms against NFE for every sampler.

Train both models with the same backbone, batch, lr, EMA and wall-clock budget (Hoda digits at 32x32,
unet_tiny, 30 minutes of one core): ``experiment=edm_hoda32`` and ``experiment=hoda32_uncond`` without the
log-SNR shift and class balancing it has since gained (``experiments/uncond_recipe``), the best DDPM-family
recipe of ``experiments/schedules_objectives`` (v-prediction, sigmoid schedule):

    python train.py experiment=edm_hoda32 dataset.root=/path/to/hoda threads=1
    python train.py experiment=hoda32_uncond dataset.root=/path/to/hoda threads=1 schedule.log_snr_shift=0 \
        dataset.balance_classes=false

then score them (the digit classifier of the metrics group must exist, see ``diffusion_lab.evaluate``):

    python -m experiments.edm_vs_ddpm --edm outputs/edm_hoda32/runs/<run>/checkpoints/last.ckpt \
        --ddpm outputs/hoda32_uncond/runs/<run>/checkpoints/last.ckpt --data-root /path/to/hoda --n 1000

Every sampler (Heun, Euler, DDIM with eta = 0, DPM-Solver++(2M), and ancestral DDPM) runs on both models at
the same network-evaluation budgets (``--nfe``; Heun takes (NFE + 1) / 2 steps), each on its default grid
(Karras for Euler / Heun), drawing ``--n`` samples from the EMA weights with the same seed in every row. Each
row is scored against the real test split and appended to ``results.json``; at the end ``table.md``,
``fid_vs_nfe.png`` and one sample grid per model and sampler (at the largest NFE) are written to ``--out``.
The reference row scores ``--n`` random real test images against the whole test split: the FID floor at this
sample size, and the real class histogram.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from diffusion_lab.metrics.reference import real_reference
from diffusion_lab.sample import generate
from diffusion_lab.samplers import get_sampler
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.utils.media import save_grid

SAMPLERS = ("heun", "euler", "ddim", "dpm_solver", "ddpm")
LABELS = {
    "heun": "Heun (EDM Alg. 2)",
    "euler": "Euler",
    "ddim": "DDIM (eta 0)",
    "dpm_solver": "DPM-Solver++(2M)",
    "ddpm": "DDPM ancestral",
}
GRID = {  # each sampler's default grid
    "heun": "karras",
    "euler": "karras",
    "ddim": "uniform",
    "dpm_solver": "logsnr_uniform",
    "ddpm": "uniform",
}
HEADLINE = ("edm", "heun", 35)  # EDM's setting: Heun, 18 steps = 35 network evaluations


def steps_for(sampler: str, nfe: int) -> int:
    """Steps that spend ``nfe`` network evaluations: Heun takes 2 per step but 1 on the last."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def random_subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n images drawn without replacement by a seeded permutation. Not the first n: a test split may be
    stored sorted by class (Hoda's is), and its first 1,000 images are then 98% zeros."""
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edm", required=True, help="checkpoint of the objective=edm run")
    p.add_argument("--ddpm", required=True, help="checkpoint of the DDPM-family run")
    p.add_argument("--data-root", default=None, help="where the checkpoints' dataset lives now")
    p.add_argument("--n", type=int, default=1000, help="samples per row")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--nfe", nargs="+", type=int, default=[9, 17, 35], help="network evaluations per row")
    p.add_argument("--ddpm-nfe", nargs="*", type=int, default=[100], help="extra NFE for ancestral DDPM")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--classifier", default=None, help="digit classifier (default: the run's metrics config)")
    p.add_argument("--out", default="experiments/edm_vs_ddpm")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    models, meta = {}, {"n_samples": args.n, "seed": args.seed, "torch": torch.__version__}
    for key, path in (("edm", args.edm), ("ddpm", args.ddpm)):
        module, cfg, ckpt = load_module(path)
        models[key] = (module, cfg)
        meta[key] = {
            "checkpoint": str(Path(path).resolve()),
            "global_step": ckpt.get("global_step"),
            "diffusion": f"{type(module.diffusion).__name__}({module.diffusion.extra_repr()})",
            "model": cfg.model._target_.rsplit(".", 1)[-1],
            "parameters": sum(q.numel() for q in module.model.parameters()),
            "max_time": cfg.trainer.get("max_time"),
        }
    cfg = models["edm"][1]
    ref = real_reference(cfg, data_root=args.data_root, classifier=args.classifier)
    dm, suite, key, real = ref.datamodule, ref.suite, ref.key, ref.images
    meta["dataset"] = f"{dm.name} {dm.image_size}x{dm.image_size} (real: test split, {len(real)} images)"
    meta["hardware"] = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}"
    )
    reference = suite.compute(random_subset(real, args.n, args.seed), real=real, cache_key=key)
    meta["reference"] = {
        "fid_classifier": reference["fid_classifier"],
        "class_histogram": reference["class_histogram"].tolist(),
    }

    plan = [(m, s, nfe) for m in models for s in args.samplers for nfe in args.nfe]
    if "ddpm" in args.samplers:
        plan += [(m, "ddpm", nfe) for m in models for nfe in args.ddpm_nfe]
    largest = {(m, s): max(n for mm, ss, n in plan if (mm, ss) == (m, s)) for m, s, _ in plan}
    rows: list[dict] = []
    for model_key, name, nfe in plan:
        module, _ = models[model_key]
        steps, grid = steps_for(name, nfe), GRID[name]
        sampler = partial(get_sampler(name), steps=steps, grid=grid)
        start = time.perf_counter()
        fake, _, used = generate(module, sampler, args.n, seed=args.seed, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        scores = suite.compute(fake, cache_key=key)
        row = {
            "model": model_key,
            "sampler": name,
            "grid": grid,
            "steps": steps,
            "nfe": used,
            "fid_classifier": scores["fid_classifier"],
            "class_entropy": scores["class_entropy"],
            "class_histogram": scores["class_histogram"].tolist(),
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(
            f"{model_key:>4} {name:>10} {grid:>14} {steps:>4} steps  NFE {used:>4}  "
            f"FID(classifier) {row['fid_classifier']:8.3f}  {seconds:6.1f} s",
            flush=True,
        )
        if nfe == largest[(model_key, name)]:
            save_grid(fake[:100], out / f"samples_{model_key}_{name}{steps}.png")
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_table(meta, rows, out / "table.md")
    plot(rows, out / "fid_vs_nfe.png")
    print((out / "table.md").read_text())


def write_table(meta: dict, rows: list[dict], path: Path) -> None:
    """table.md: the headline comparison, FID by model x sampler x NFE, and the class histograms."""
    fid = {(r["model"], r["sampler"], r["nfe"]): r for r in rows}
    nfes = sorted({r["nfe"] for r in rows})
    lines = [
        f"Data: {meta['dataset']}. {meta['n_samples']} samples per row (seed {meta['seed']}), EMA weights; "
        f"FID on the digit classifier's features (lower is better). Hardware: {meta['hardware']}.",
        "",
    ]
    for key in ("edm", "ddpm"):
        m = meta[key]
        lines.append(
            f"- {key}: {m['diffusion']}, {m['model']} ({m['parameters']:,} parameters), step "
            f"{m['global_step']} (budget {m['max_time']})"
        )
    ref = meta["reference"]
    lines += [
        "",
        f"Reference: {meta['n_samples']} real test images scored the same way: "
        f"FID {ref['fid_classifier']:.2f}.",
        "",
    ]
    edm = fid.get(HEADLINE)
    ddpm_rows = [r for r in rows if r["model"] == "ddpm" and r["nfe"] == HEADLINE[2]]
    if edm and ddpm_rows:
        best = min(ddpm_rows, key=lambda r: r["fid_classifier"])
        lines += [
            f"Headline at {HEADLINE[2]} NFE: EDM + Heun FID {edm['fid_classifier']:.2f}; best DDPM-family "
            f"sampler ({LABELS[best['sampler']]}) FID {best['fid_classifier']:.2f}.",
            "",
        ]
    lines += [
        "| model | sampler | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|---|" + "---|" * len(nfes),
    ]
    for key in ("edm", "ddpm"):
        for s in SAMPLERS:
            cells = [fid.get((key, s, n)) for n in nfes]
            if any(cells):
                vals = ["" if c is None else f"{c['fid_classifier']:.2f}" for c in cells]
                lines.append(f"| {key} | {LABELS[s]} | {GRID[s]} | " + " | ".join(vals) + " |")
    lines += ["", "Class histograms (fraction per predicted class 0-9) at each row's largest NFE:", ""]
    lines += ["| model | sampler | NFE | class entropy | histogram |", "|---|---|---|---|---|"]
    lines.append(f"| real | - | - | - | {fractions(ref['class_histogram'])} |")
    for key in ("edm", "ddpm"):
        for s in SAMPLERS:
            mine = [r for r in rows if r["model"] == key and r["sampler"] == s]
            if mine:
                r = max(mine, key=lambda r: r["nfe"])
                hist = fractions(r["class_histogram"])
                lines.append(f"| {key} | {LABELS[s]} | {r['nfe']} | {abs(r['class_entropy']):.3f} | {hist} |")
    path.write_text("\n".join(lines) + "\n")


def fractions(counts: list[float]) -> str:
    total = sum(counts) or 1.0
    return " ".join(f"{c / total:.3f}" for c in counts)


def plot(rows: list[dict], path: Path) -> None:
    """FID against NFE, one panel per model, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("edm", "ddpm") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 3.8), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], models):
        for s in SAMPLERS:
            mine = [r for r in rows if r["model"] == m and r["sampler"] == s]
            pts = sorted((r["nfe"], r["fid_classifier"]) for r in mine)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[s])
        ax.set_title({"edm": "EDM model", "ddpm": "DDPM-family model"}[m])
        ax.set_xscale("log")
        nfes = sorted({r["nfe"] for r in rows if r["model"] == m})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations (NFE)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FID (classifier features)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
