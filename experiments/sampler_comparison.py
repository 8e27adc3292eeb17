"""Sampler x timestep-grid comparison on one checkpoint: classifier-feature FID and wall time against NFE.

    python -m experiments.sampler_comparison --ckpt outputs/persian_sampler_study/runs/.../last.ckpt \
        --data-root /path/to/hoda --n 500 --threads 1

Every sampler (DDPM, DDIM with eta = 0, DPM-Solver++(2M)) runs on every grid (``--grids``, default all of
``diffusion_lab.samplers.GRIDS`` but ``time_uniform``, which lies within one step of ``trailing``) at every
step count (``--steps``), so the grid is held fixed when samplers are compared and each sampler can be read
on its best grid. Every row draws the same number of samples from
the EMA weights with the same seeds (the same x_T in every row), scores them against the checkpoint's real
test split, and appends to ``results.json`` as it goes; ``table.md`` and ``fid_vs_nfe.png`` (one line per
sampler x grid) are written at the end. A few settings are repeated with other seeds (``--seed-repeats``) to
show the seed-to-seed spread of the FID at this sample size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from diffusion_lab.metrics.reference import real_reference
from diffusion_lab.sample import generate
from diffusion_lab.samplers import GRIDS, get_sampler
from diffusion_lab.training.checkpoint import load_module

SAMPLERS = ("ddpm", "ddim", "dpm_solver")
LABELS = {"ddpm": "DDPM", "ddim": "DDIM (eta 0)", "dpm_solver": "DPM-Solver++(2M)"}
DEFAULT_GRID = {"ddpm": "uniform", "ddim": "uniform", "dpm_solver": "logsnr_uniform"}
STUDY_GRIDS = [g for g in GRIDS if g != "time_uniform"]  # time_uniform is trailing up to one step


def parse_row(text: str) -> tuple[str, int, str]:
    """ "sampler:steps[:grid]" -> (sampler, steps, grid); the grid defaults to the sampler's default."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SAMPLERS or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"'{text}': write sampler:steps[:grid], e.g. ddim:20:trailing")
    grid = parts[2] if len(parts) == 3 else DEFAULT_GRID[parts[0]]
    if grid not in GRIDS:
        raise argparse.ArgumentTypeError(f"'{text}': unknown grid '{grid}'; valid: {', '.join(GRIDS)}")
    return parts[0], int(parts[1]), grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data-root", default=None, help="where the checkpoint's dataset lives now")
    p.add_argument("--n", type=int, default=500, help="samples per row")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument(
        "--classifier", default=None, help="digit classifier (default: the run's metrics.classifier_path)"
    )
    p.add_argument("--out", default="experiments/sampler_comparison")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--grids", nargs="+", default=STUDY_GRIDS, choices=list(GRIDS))
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50], help="network evaluations per row")
    p.add_argument(
        "--extra",
        nargs="*",
        type=parse_row,
        default=[("ddpm", 100, "uniform")],
        help="more rows after the grid of rows, as sampler:steps[:grid]",
    )
    p.add_argument(
        "--only", nargs="*", type=parse_row, default=None, help="just these rows (sampler:steps[:grid])"
    )
    p.add_argument(
        "--seed-repeats",
        nargs="*",
        type=parse_row,
        default=[
            ("ddim", 20, "uniform"),
            ("ddpm", 20, "uniform"),
            ("ddpm", 10, "uniform"),
            ("ddpm", 10, "trailing"),
            ("dpm_solver", 10, "logsnr_uniform"),
            ("dpm_solver", 10, "trailing"),
        ],
        help="rows drawn again with seeds 1 and 2 (the seed-to-seed spread of the FID, and whether a "
        "difference between two rows holds for every seed); also run with --only",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    module, cfg, ckpt = load_module(args.ckpt)
    reference = real_reference(
        cfg,
        data_root=args.data_root,
        names=["fid_classifier", "kid_classifier", "class_histogram"],
        classifier=args.classifier,
    )
    dm, suite, key, real = reference.datamodule, reference.suite, reference.key, reference.images
    suite.compute(real[:100], real=real, cache_key=key)  # real statistics once, outside the timings

    if args.only is not None:
        plan = [(row, 0) for row in args.only]
    else:
        plan = [((s, n, g), 0) for s, g, n in itertools.product(args.samplers, args.grids, args.steps)]
        plan += [(row, 0) for row in args.extra]
    plan += [(row, seed) for row in args.seed_repeats for seed in (1, 2)]
    meta = {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "global_step": ckpt.get("global_step"),
        "dataset": f"{dm.name} {dm.image_size}x{dm.image_size} (real: test split, {len(real)} images)",
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "schedule": cfg.schedule.name if "parameterization" in cfg.objective else "edm karras",
        "timesteps": module.diffusion.num_timesteps,
        "objective": cfg.objective.get("parameterization", "edm"),
        "n_samples": args.n,
        "hardware": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, CPU only",
        "torch": torch.__version__,
    }
    rows: list[dict] = []
    for (name, steps, grid), seed in plan:
        sampler = partial(get_sampler(name), steps=steps, grid=grid)
        start, cpu_start = time.perf_counter(), time.process_time()
        fake, _, nfe = generate(module, sampler, args.n, seed=seed, batch_size=args.batch_size)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        scores = suite.compute(fake, cache_key=key)
        hist = scores.pop("class_histogram").tolist()
        row = {
            "sampler": name,
            "grid": grid,
            "steps": steps,
            "nfe": nfe,
            "seed": seed,
            "fid_classifier": scores["fid_classifier"],
            "kid_classifier": scores["kid_classifier"],
            "class_entropy": scores["class_entropy"],
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "cpu_seconds_per_1k": round(1000 * cpu_seconds / args.n, 1),
            "class_histogram": hist,
        }
        rows.append(row)
        print(
            f"{name:>10} {grid:>14} {steps:>4} steps  NFE {nfe:>4}  seed {seed}  "
            f"FID(classifier) {row['fid_classifier']:7.3f}  KID(classifier) {row['kid_classifier']:.4f}  "
            f"{seconds:6.1f} s ({cpu_seconds:.1f} s CPU)",
            flush=True,
        )
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_table(meta, rows, out / "table.md")
    _plot(rows, out / "fid_vs_nfe.png")
    print((out / "table.md").read_text())


def write_table(meta: dict, rows: list[dict], path: Path) -> None:
    """table.md: the grid held fixed, every sampler x grid, the seed spread, and every row in full."""
    main_rows = [r for r in rows if r["seed"] == 0]
    fid = {(r["sampler"], r["grid"], r["nfe"]): r["fid_classifier"] for r in main_rows}
    nfes = sorted({r["nfe"] for r in main_rows})
    samplers = [s for s in SAMPLERS if any(r["sampler"] == s for r in main_rows)]
    grids = [g for g in GRIDS if any(r["grid"] == g for r in main_rows)]

    def cells(s: str, g: str, bold: set) -> list[str]:
        out = []
        for n in nfes:
            v = fid.get((s, g, n))
            out.append("" if v is None else (f"**{v:.2f}**" if (s, g, n) in bold else f"{v:.2f}"))
        return out

    best = set()  # each sampler's lowest FID at each NFE
    for s, n in itertools.product(samplers, nfes):
        scored = [(fid[(s, g, n)], g) for g in grids if (s, g, n) in fid]
        if scored:
            best.add((s, min(scored)[1], n))
    head = "| sampler | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    rule = "|---|---|" + "---|" * len(nfes)
    lines = [
        f"Checkpoint: {meta['dataset']}, {meta['model']} ({meta['parameters']:,} parameters), "
        f"{meta['schedule']} schedule (T = {meta['timesteps']}), {meta['objective']} objective, EMA weights "
        f"at step {meta['global_step']}. {meta['n_samples']} samples per row, the same x_T in every row "
        f"(seed 0). FID on the digit classifier's features (lower is better). Hardware: {meta['hardware']} "
        "(a machine shared with other jobs: CPU time is the cost, wall time includes waiting).",
        "",
        "FID (classifier features) by sampler, grid and network evaluations; **bold**: the sampler's best "
        "grid at that NFE. Empty: not run.",
        "",
        head,
        rule,
    ]
    for s, g in itertools.product(samplers, grids):
        if any((s, g, n) in fid for n in nfes):
            lines.append(f"| {LABELS[s]} | {g} | " + " | ".join(cells(s, g, best)) + " |")
    fixed = [g for g in ("uniform", "logsnr_uniform") if g in grids]
    if fixed:
        lines += ["", "The grid held fixed (every sampler on the same steps):", "", head, rule]
        for g, s in itertools.product(fixed, samplers):
            lines.append(f"| {LABELS[s]} | {g} | " + " | ".join(cells(s, g, set())) + " |")
    repeats = {}
    for r in rows:
        repeats.setdefault((r["sampler"], r["grid"], r["nfe"]), {})[r["seed"]] = r["fid_classifier"]
    spread = {k: v for k, v in repeats.items() if len(v) > 1}
    if spread:
        lines += ["", "Seed-to-seed spread (the same setting with other x_T and noise):", ""]
        lines += ["| sampler | grid | NFE | FID by seed | mean +- std |", "|---|---|---|---|---|"]
        for (s, g, n), by_seed in spread.items():
            vals = [by_seed[k] for k in sorted(by_seed)]
            lines.append(
                f"| {LABELS[s]} | {g} | {n} | {' / '.join(f'{v:.2f}' for v in vals)} | "
                f"{statistics.mean(vals):.2f} +- {statistics.stdev(vals):.2f} |"
            )
    lines += [
        "",
        "Every row:",
        "",
        "| sampler | grid | steps | NFE | seed | FID (classifier features) | KID (classifier features) | "
        "class entropy | wall time (s) | CPU time (s) | CPU s per 1k samples |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['grid']} | {r['steps']} | {r['nfe']} | {r['seed']} | "
            f"{r['fid_classifier']:.3f} | {r['kid_classifier']:.4f} | {r['class_entropy']:.3f} | "
            f"{r['seconds']} | {r['cpu_seconds']} | {r['cpu_seconds_per_1k']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_rows = [r for r in rows if r["seed"] == 0]
    samplers = [s for s in SAMPLERS if any(r["sampler"] == s for r in main_rows)]
    fig, axes = plt.subplots(1, len(samplers), figsize=(4.2 * len(samplers), 3.6), sharey=True, squeeze=False)
    markers = dict(zip(GRIDS, "osv^Dx"))
    for ax, s in zip(axes[0], samplers):
        for g in GRIDS:
            pts = sorted(
                (r["nfe"], r["fid_classifier"]) for r in main_rows if r["sampler"] == s and r["grid"] == g
            )
            if pts:
                ax.plot(*zip(*pts), marker=markers[g], label=g)
        ax.set_title(LABELS[s])
        ax.set_xscale("log")
        nfes = sorted({r["nfe"] for r in main_rows if r["sampler"] == s})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations (NFE)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FID (classifier features)")
    axes[0][0].legend(title="grid", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
