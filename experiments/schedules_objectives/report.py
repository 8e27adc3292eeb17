"""Table and sample montage of the schedules x objectives multirun.

    python -m experiments.schedules_objectives.report outputs/schedules_objectives/multiruns/<date>

writes ``results.md`` (the table), ``results.csv`` and ``samples.png`` (one grid per cell) beside this file.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
from pathlib import Path

import torch
import yaml

from diffusion_lab.summarize import collect

HERE = Path(__file__).resolve().parent
SCHEDULES = ["linear", "cosine", "sigmoid"]
OBJECTIVES = ["eps", "v", "hybrid", "vlb"]


def _wall_seconds(job: Path) -> float:
    start = (job / ".hydra" / "config.yaml").stat().st_mtime
    return (job / "result.yaml").stat().st_mtime - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("multirun_dir")
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args(argv)
    root, out = Path(args.multirun_dir), Path(args.out)
    rows, _, _ = collect(root)
    table = []
    for r in rows:
        job = root / r["job"]
        if r.get("status") != "done":
            continue
        table.append(
            {
                "schedule": r.get("schedule"),
                "objective": r.get("objective"),
                "fid_classifier": r.get("val/fid_classifier"),
                "fid_samples": r.get("val/metric_samples"),
                "val_bpd": r.get("val/bpd"),
                "train_loss": r.get("train/loss"),
                "val_loss": r.get("val/loss"),
                "steps": r.get("global_step"),
                "wall_s": round(_wall_seconds(job)),
                "job": r["job"],
            }
        )
    table.sort(key=lambda t: (SCHEDULES.index(t["schedule"]), OBJECTIVES.index(t["objective"])))
    first = yaml.safe_load((root / table[0]["job"] / "csv" / "hparams.yaml").read_text())  # resolved config
    threads = first.get("threads") or torch.get_num_threads()
    hardware = f"{platform.machine()} CPU ({os.cpu_count()} cores), {threads} torch thread(s) per run, no GPU"
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    n = int(table[0]["fid_samples"] or 0)
    lines = [
        f"Hardware: {hardware}. Total wall time: {sum(t['wall_s'] for t in table) / 60:.1f} min "
        f"for {len(table)} runs.",
        "",
        f"| schedule | objective | FID (classifier features, {n} samples) | val bits/dim (MC) | "
        "train loss | val loss | steps | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['schedule']} | {t['objective']} | {t['fid_classifier']:.2f} | {t['val_bpd']:.3f} | "
            f"{t['train_loss']:.4f} | {t['val_loss']:.4f} | {t['steps']} | {t['wall_s']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _montage(root, table, out / "samples.png")


def _montage(root: Path, table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(SCHEDULES), len(OBJECTIVES), figsize=(3 * len(OBJECTIVES), 3.2 * len(SCHEDULES))
    )
    for ax in axes.flat:
        ax.axis("off")
    for t in table:
        grid = root / t["job"] / "samples" / "final.png"
        if grid.is_file():
            ax = axes[SCHEDULES.index(t["schedule"])][OBJECTIVES.index(t["objective"])]
            ax.imshow(mpimg.imread(grid), cmap="gray")
            ax.set_title(
                f"{t['schedule']} / {t['objective']}\nFID(clf) {t['fid_classifier']:.1f}", fontsize=9
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
