"""Collect the backbone study (run.sh) into results.json, results.md and one sample grid per backbone.

    python -m experiments.backbones.report outputs/backbones [--out experiments/backbones]

Training images/s is images seen (global step x batch 64) over the 30-minute budget, validation and
checkpoints included: the rate a user gets. Sampling images/s is evaluate's 2,000 samples over its sampling
seconds (Heun 18 steps = 35 network evaluations). The class histogram is summarised by its largest relative
deviation from a uniform tenth and Pearson's chi-square p-value (``metrics.suite.uniformity``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from diffusion_lab.metrics.suite import uniformity
from experiments.backbones.match import BACKBONES, hydra_overrides

BATCH = 64
BUDGET_S = 30 * 60


def collect(run_dir: Path) -> list[dict]:
    flops = json.loads((run_dir / "flops.json").read_text())
    rows = []
    for name in BACKBONES:
        ev = json.loads((run_dir / f"{name}.eval.json").read_text())
        hist = torch.tensor(ev["class_histogram"])
        step = int(ev["global_step"])
        rows.append(
            {
                "backbone": name,
                "overrides": hydra_overrides(name),
                "parameters": flops[name]["parameters"],
                "train_gflop_per_image": flops[name]["train_gflop"],
                "global_step": step,
                "train_images_per_s": round(step * BATCH / BUDGET_S, 1),
                "train_pflop": round(step * BATCH * flops[name]["train_gflop"] / 1e6, 2),
                "fid_classifier": round(ev["fid_classifier"], 3),
                "class_histogram": [int(c) for c in hist.tolist()],
                **uniformity(hist),
                "sample_images_per_s": round(ev["n"] / ev["sampling_seconds"], 2),
                "nfe": ev["nfe"],
                "n": ev["n"],
            }
        )
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = [
        "backbone",
        "parameters",
        "train GFLOP / image",
        "steps",
        "train images/s",
        "train PFLOP",
        "FID (classifier)",
        "class histogram",
        "max class deviation",
        "sample images/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r['backbone']} (`{r['overrides']}`)",
            f"{r['parameters']:,}",
            r["train_gflop_per_image"],
            r["global_step"],
            r["train_images_per_s"],
            r["train_pflop"],
            r["fid_classifier"],
            " ".join(map(str, r["class_histogram"])),
            f"{r['class_max_deviation']:.0%}",
            r["sample_images_per_s"],
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="run.sh's OUT folder (outputs/backbones)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = p.parse_args(argv)
    rows = collect(args.run_dir)
    meta = {"torch": torch.__version__, "batch": BATCH, "budget_seconds": BUDGET_S}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / "results.md").write_text(to_markdown(rows))
    for r in rows:
        grid = args.run_dir / f"{r['backbone']}.samples" / "grid.png"
        if grid.is_file():
            shutil.copy(grid, args.out / f"samples_{r['backbone']}.png")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
