"""EMA-length sweep of one run with post-hoc EMA (Karras et al. 2024, EDM2 Sec. 3.2 and Fig. 5).

A run trained with ``callbacks=phema`` saved snapshots of two power-function EMA profiles; this reconstructs
the EMA of every requested sigma_rel from them (:func:`diffusion_lab.training.phema.reconstruct_state`),
draws ``--n`` samples of each with the same seed and sampler, and scores them against the real test split:

- FID on the dataset classifier's features (the real features are computed once and cached),
- bits/dim (the exact bound, all T terms + prior) on ``--bpd-n`` test images, for the discrete families
  (EDM has none),
- the same two for the run's classic EMA (``callbacks.ema``, its decay fixed before training), as the
  reference line.

    python -m experiments.phema_sweep --run-dir outputs/train/runs/<run> --data-root /path/to/hoda \\
        --out experiments/phema_sweep/hoda32_uncond

writes ``results.json``, ``table.md`` and ``sweep.png`` (FID and bits/dim against sigma_rel, like EDM2's
Fig. 5) and prints the best sigma_rel. The reconstruction of one sigma_rel is what
``python -m diffusion_lab.phema run_dir=<run> sigma_rel=S`` writes as a checkpoint.
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
from diffusion_lab.training.phema import list_snapshots, reconstruct_state

DEFAULT_SIGMA_RELS = [0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25]


def score(module, sampler, suite, key, dm, args, bpd_images) -> dict:
    """FID (classifier features) of ``args.n`` samples, and bits/dim on ``bpd_images`` when given."""
    from diffusion_lab.evaluate import exact_bpd

    start = time.perf_counter()
    fake, _, nfe = generate(module, sampler, args.n, seed=args.seed, batch_size=args.batch_size)
    scores = suite.compute(fake, real=lambda: dm.real_images("test")[0], cache_key=key)
    row = {"fid_classifier": float(scores["fid_classifier"]), "nfe": nfe}
    if bpd_images is not None:
        images, labels = bpd_images
        row["bpd"], row["bpd_stderr"] = exact_bpd(module, images, labels, args.batch_size, "cpu", args.seed)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a run trained with callbacks=phema")
    p.add_argument(
        "--ckpt", default=None, help="the run's checkpoint (default: <run-dir>/checkpoints/last.ckpt)"
    )
    p.add_argument("--sigma-rels", nargs="+", type=float, default=DEFAULT_SIGMA_RELS)
    p.add_argument("--step", type=int, default=None, help="snapshot step to reconstruct (default: the last)")
    p.add_argument("--data-root", default=None, help="where the run's dataset lives now")
    p.add_argument("--n", type=int, default=2000, help="samples per sigma_rel")
    p.add_argument(
        "--bpd-n", type=int, default=0, help="test images for bits/dim (0: skip; discrete families)"
    )
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--sampler", default="dpm_solver")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--classifier", default=None, help="default: the run's metrics.classifier_path")
    p.add_argument("--out", default="experiments/phema_sweep")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir, out = Path(args.run_dir), Path(args.out)
    snapshots = list_snapshots(run_dir / "phema")
    if not snapshots:
        raise SystemExit(f"no post-hoc EMA snapshots in {run_dir / 'phema'}: train with callbacks=phema")
    ckpt_path = Path(args.ckpt) if args.ckpt else run_dir / "checkpoints" / "last.ckpt"
    module, cfg, ckpt = load_module(ckpt_path)  # the classic EMA weights
    base_state = {k: v.clone() for k, v in module.state_dict().items()}
    reference = real_reference(
        cfg, data_root=args.data_root, names=["fid_classifier"], classifier=args.classifier
    )
    dm, suite, key = reference.datamodule, reference.suite, reference.key
    from diffusion_lab.processes.edm import EDMDiffusion

    bpd_images = None
    if args.bpd_n > 0 and not isinstance(module.diffusion, EDMDiffusion):
        bpd_images = dm.real_images("test", args.bpd_n)
    sampler = partial(get_sampler(args.sampler), steps=args.steps)
    out.mkdir(parents=True, exist_ok=True)
    decay = (cfg.get("callbacks") or {}).get("ema", {}) or {}
    meta = {
        "run_dir": str(run_dir.resolve()),
        "checkpoint_step": ckpt.get("global_step"),
        "snapshots": len(snapshots),
        "dataset": f"{dm.name} {dm.image_size}x{dm.image_size}, real: test split",
        "sampler": f"{args.sampler}, {args.steps} steps",
        "n_samples": args.n,
        "seed": args.seed,
        "classic_ema_decay": decay.get("decay"),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    reference = score(module, sampler, suite, key, dm, args, bpd_images)
    print(
        f"classic EMA (decay {meta['classic_ema_decay']}): FID {reference['fid_classifier']:.2f}", flush=True
    )
    rows = []
    for s in args.sigma_rels:
        state, info = reconstruct_state(snapshots, s, args.step)
        module.load_state_dict({**base_state, **state})
        row = {
            "sigma_rel": s,
            "step": info["step"],
            **score(module, sampler, suite, key, dm, args, bpd_images),
        }
        rows.append(row)
        extra = f"  bits/dim {row['bpd']:.4f}" if "bpd" in row else ""
        print(
            f"sigma_rel {s:.3f}: FID {row['fid_classifier']:.2f}{extra}  ({row['seconds']:.0f} s)", flush=True
        )
        (out / "results.json").write_text(
            json.dumps({"meta": meta, "classic_ema": reference, "rows": rows}, indent=2)
        )
    best = min(rows, key=lambda r: r["fid_classifier"])
    meta["best_sigma_rel"] = best["sigma_rel"]
    result = {"meta": meta, "classic_ema": reference, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_table(result, out / "table.md")
    plot(result, out / "sweep.png")
    print(
        f"best sigma_rel {best['sigma_rel']:.3f}: FID {best['fid_classifier']:.2f} "
        f"(classic EMA: {reference['fid_classifier']:.2f}) -> {out}"
    )
    return result


def write_table(result: dict, path: Path) -> None:
    meta, ref, rows = result["meta"], result["classic_ema"], result["rows"]
    bpd = "bpd" in ref
    lines = [
        f"Run {meta['run_dir']} at step {rows[0]['step'] if rows else '-'} ({meta['snapshots']} snapshots); "
        f"{meta['dataset']}; {meta['sampler']}; {meta['n_samples']} samples each, seed {meta['seed']}; "
        f"{meta['hardware']}.",
        "",
        "| EMA | FID (classifier) |" + (" bits/dim |" if bpd else ""),
        "|---|---|" + ("---|" if bpd else ""),
        f"| classic, decay {meta['classic_ema_decay']} | {ref['fid_classifier']:.2f} |"
        + (f" {ref['bpd']:.4f} |" if bpd else ""),
    ]
    for r in rows:
        mark = " **best**" if r["sigma_rel"] == meta.get("best_sigma_rel") else ""
        lines.append(
            f"| sigma_rel {r['sigma_rel']:.3f}{mark} | {r['fid_classifier']:.2f} |"
            + (f" {r['bpd']:.4f} |" if bpd else "")
        )
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, ref, rows = result["meta"], result["classic_ema"], result["rows"]
    keys = [("fid_classifier", "FID (classifier features)")] + ([("bpd", "bits/dim")] if "bpd" in ref else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.4), squeeze=False)
    s = [r["sigma_rel"] for r in rows]
    for ax, (key, label) in zip(axes[0], keys):
        ax.plot(s, [r[key] for r in rows], "o-", label="post-hoc EMA")
        ax.axhline(ref[key], color="gray", ls="--", label=f"classic EMA, decay {meta['classic_ema_decay']}")
        if key == "fid_classifier":
            best = min(rows, key=lambda r: r[key])
            ax.plot([best["sigma_rel"]], [best[key]], "r*", ms=12, label=f"best: {best['sigma_rel']:.3f}")
        ax.set_xlabel("sigma_rel (EMA length)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['dataset'].split(',')[0]}: EMA length sweep (cf. EDM2 Fig. 5)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
