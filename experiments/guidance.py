"""Classifier-free guidance sweep: fidelity against diversity as the guidance scale grows.

Ho & Salimans (2022) guide a class-conditional model with its own unconditional half (the label dropped
with probability ``cond_drop_prob`` in training):

    eps~(x_t, c) = eps(x_t) + s (eps(x_t, c) - eps(x_t))        (s = 1 + w in the paper's notation)

so s = 0 is the unconditional model, s = 1 the conditional one and s > 1 pushes samples towards what the
classifier-free "implicit classifier" p(c | x_t) finds most typical of c. The paper reports FID falling
then rising with s while Inception Score (fidelity) keeps rising: guidance trades diversity for fidelity.

For every scale this draws ``--n`` samples of the checkpoint (labels 0, 1, ..., K-1, 0, ... so every class
gets n / K), with the same seed, and scores them with the dataset's classifier (``evaluate
train_classifier``):

- FID on the classifier's features against the real test split (all classes pooled),
- accuracy: how often the classifier names the requested class (fidelity to the label),
- class entropy: entropy of the predicted-class histogram / log K (1 = every class equally often),
- within-class spread: the mean distance of a class's samples to their class mean in classifier features,
  relative to the same for real images of that class (1 = as diverse as the data; below 1 = collapse).

    python -m experiments.guidance --ckpt <run>/checkpoints/last.ckpt --data-root /path/to/hoda \\
        --out experiments/guidance/digits

writes ``results.json``, ``table.md``, ``guidance.png`` (the four quantities against s) and a
class-by-column grid per scale (``grid_s<scale>.png``: column k holds class k).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch

from diffusion_lab.metrics.classifier import load_classifier
from diffusion_lab.metrics.reference import real_reference
from diffusion_lab.sample import generate, grid_layout
from diffusion_lab.samplers import get_sampler
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.utils.media import save_grid, to_unit_range


@torch.no_grad()
def classify(classifier, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> (features (N, D), predicted classes (N,)) of the frozen classifier."""
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f, logits = classifier.features_and_logits(to_unit_range(images[i : i + batch_size]))
        feats.append(f)
        preds.append(logits.argmax(-1))
    return torch.cat(feats), torch.cat(preds)


def class_spread(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class: the mean Euclidean distance of its members' features to their class mean (nan if < 2)."""
    out = torch.full((num_classes,), float("nan"))
    for k in range(num_classes):
        f = features[labels == k]
        if len(f) >= 2:
            out[k] = (f - f.mean(0)).norm(dim=1).mean()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint of a class-conditional run")
    p.add_argument("--data-root", default=None, help="where the checkpoint's dataset lives now")
    p.add_argument("--scales", nargs="+", type=float, default=[0, 1, 1.5, 2, 3, 5])
    p.add_argument("--n", type=int, default=1000, help="samples per scale")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--sampler", default="dpm_solver")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--classifier", default=None, help="default: the run's metrics.classifier_path")
    p.add_argument("--out", default="experiments/guidance")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    module, cfg, ckpt = load_module(args.ckpt)
    if not module.hparams.class_conditional:
        raise SystemExit(f"{args.ckpt}: the model is unconditional; guidance needs class_conditional=true")
    k = int(module.hparams.num_classes)
    classifier_path = args.classifier or cfg.metrics.classifier_path
    reference = real_reference(cfg, data_root=args.data_root, classifier=classifier_path)
    dm, suite, key = reference.datamodule, reference.suite, reference.key
    real, real_labels = reference.images, reference.labels
    names = dm.class_names
    classifier = load_classifier(classifier_path)
    out.mkdir(parents=True, exist_ok=True)

    real_feats, real_pred = classify(classifier, real)
    real_spread = class_spread(real_feats, real_labels, k)
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    ref = suite.compute(real[pick], real=real, cache_key=key)
    meta = {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "global_step": ckpt.get("global_step"),
        "dataset": f"{dm.name} {dm.image_size}x{dm.image_size}, real: test split ({len(real)} images)",
        "classes": names,
        "cond_drop_prob": float(cfg.get("cond_drop_prob", 0.0)),
        "sampler": f"{args.sampler}, {args.steps} steps",
        "n_samples": args.n,
        "seed": args.seed,
        "classifier": str(classifier_path),
        "classifier_accuracy_on_real_test": float((real_pred == real_labels).float().mean()),
        "reference": {
            "fid_classifier": ref["fid_classifier"],
            "class_entropy": ref["class_entropy"],
            "accuracy": float((real_pred[pick] == real_labels[pick]).float().mean()),
        },
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    rows = []
    for s in args.scales:
        sampler = partial(get_sampler(args.sampler), steps=args.steps, guidance_scale=s)
        start = time.perf_counter()
        fake, labels, nfe = generate(module, sampler, args.n, seed=args.seed, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        scores = suite.compute(fake, cache_key=key)
        feats, pred = classify(classifier, fake)
        correct = (pred == labels).float()
        per_class = torch.stack([correct[labels == c].mean() for c in range(k)])
        spread = class_spread(feats, labels, k) / real_spread
        row = {
            "guidance_scale": s,
            "fid_classifier": scores["fid_classifier"],
            "accuracy": float(correct.mean()),
            "worst_class_accuracy": float(per_class.nan_to_num(1.0).min()),
            "class_entropy": scores["class_entropy"],
            "within_class_spread": float(spread.nanmean()),
            "per_class_accuracy": per_class.tolist(),
            "class_histogram": scores["class_histogram"].tolist(),
            "nfe": nfe,
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(
            f"s={s:<4} FID(classifier) {row['fid_classifier']:7.2f}  accuracy {row['accuracy']:.3f}  "
            f"entropy {row['class_entropy']:.3f}  spread {row['within_class_spread']:.3f}  {seconds:.0f} s",
            flush=True,
        )
        shown, nrow = grid_layout(len(fake), k, most=k * (10 if k <= 10 else 6))
        save_grid(fake[:shown], out / f"grid_s{s:g}.png", nrow=nrow)
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_table(meta, rows, out / "table.md")
    plot(meta, rows, out / "guidance.png")
    print((out / "table.md").read_text())


def write_table(meta: dict, rows: list[dict], path: Path) -> None:
    ref = meta["reference"]
    lines = [
        f"Data: {meta['dataset']}. Checkpoint step {meta['global_step']} (label dropped with p = "
        f"{meta['cond_drop_prob']}); {meta['sampler']}; {meta['n_samples']} samples per scale, every class "
        f"equally often, seed {meta['seed']}. Scores on the dataset classifier (held-out accuracy "
        f"{meta['classifier_accuracy_on_real_test']:.2%}). Hardware: {meta['hardware']}.",
        "",
        "| guidance scale s | FID (classifier) | accuracy on the requested class | worst class | "
        "class entropy | within-class spread | seconds |",
        "|---|---|---|---|---|---|---|",
        f"| real test images | {max(ref['fid_classifier'], 0.0):.2f} | {ref['accuracy']:.3f} | - | "
        f"{ref['class_entropy']:.3f} | 1 | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r['guidance_scale']:g} | {r['fid_classifier']:.2f} | {r['accuracy']:.3f} | "
            f"{r['worst_class_accuracy']:.2f} | {r['class_entropy']:.3f} | {r['within_class_spread']:.3f} | "
            f"{r['seconds']:.0f} |"
        )
    lines += [
        "",
        "s = 0: the unconditional model; 1: the conditional model without guidance; > 1: guided. Accuracy: "
        "the classifier names the class the sample was asked for. Class entropy: of the predicted-class "
        "histogram, / log K. Within-class spread: mean feature distance to the class mean, relative to real "
        "images of the class. Last column: seconds to draw the samples.",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r["guidance_scale"] for r in rows]
    panels = [
        ("fid_classifier", "FID (classifier features)"),
        ("accuracy", "accuracy on the requested class"),
        ("within_class_spread", "within-class spread (real = 1)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(s, [r[key] for r in rows], "o-")
        ax.set_xlabel("guidance scale s")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "fid_classifier" and all(r[key] > 0 for r in rows):
            ax.set_yscale("log")
    fig.suptitle(f"{meta['dataset'].split(',')[0]}: classifier-free guidance", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
