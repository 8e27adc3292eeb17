"""Collect a multirun into one table:

    python -m diffusion_lab.summarize dir=outputs/train/multiruns/2026-11-21_10-00-00-000000 [metric=val/loss]

reads every job's overrides (``.hydra/overrides.yaml``) and final metrics (``result.yaml``) and writes
``summary.csv``, ``summary.md`` and ``summary.png`` (the metric against each swept value) in that folder.
A Hydra command (options in ``conf/summarize.yaml``; ``--help`` lists them). The plot needs the ``plot``
extra (matplotlib); without it the CSV and the table are still written.
"""

# ruff: noqa: E402  (a command sets up the process before its imports load torch)

from __future__ import annotations

if __name__ == "__main__":  # run as a command: OpenMP's settings before torch loads (utils/cpu.py)
    from diffusion_lab.utils.cpu import configure_command

    configure_command()

import csv
import sys
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from diffusion_lab.utils.cli import exit_on_bad_input
from diffusion_lab.utils.extras import MissingExtraError, require_extra

__all__ = ["collect", "write_summary", "run", "main"]

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def collect(multirun_dir: str | Path) -> tuple[list[dict], list[str], list[str]]:
    """Rows (one per job), the swept keys and the metric keys, from a Hydra multirun folder."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun folder not found: {root}")
    rows, swept, metrics = [], [], []
    for job in sorted(
        (p for p in root.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
        key=lambda p: int(p.name) if p.name.isdigit() else p.name,
    ):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict = {"job": job.name}
        for o in overrides:
            key, _, value = o.lstrip("+~").partition("=")
            row[key] = value
            if key not in swept:
                swept.append(key)
        result_file = job / "result.yaml"
        if result_file.is_file():
            result = yaml.safe_load(result_file.read_text()) or {}
            for k, v in sorted((result.get("metrics") or {}).items()):
                row[k] = v
                if k not in metrics:
                    metrics.append(k)
            row["global_step"] = result.get("global_step")
            row["status"] = "done"
        else:
            row["status"] = "no result"
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no Hydra jobs (folders with .hydra/overrides.yaml) in {root}")
    # swept = the overrides whose value differs between jobs; the others are shared settings
    varying = [k for k in swept if len({str(r.get(k)) for r in rows}) > 1]
    return rows, varying or swept, metrics


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def write_summary(multirun_dir: str | Path, metric: str | None = None) -> dict[str, Path]:
    root = Path(multirun_dir)
    rows, swept, metrics = collect(root)
    columns = ["job", *swept, "status", "global_step", *metrics]
    with open(root / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    out = {"csv": root / "summary.csv", "md": root / "summary.md"}
    metric = metric or next((m for m in ("best/fid_classifier", "val/bpd", "val/loss") if m in metrics), None)
    if metric and swept:
        try:
            require_extra("matplotlib", "plot", "the summary plot")
        except MissingExtraError as e:
            print(f"summary.png not written: {e}", file=sys.stderr)
        else:
            out["png"] = _plot(rows, swept, metric, root / "summary.png")
    return out


def _plot(rows: list[dict], swept: list[str], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.2), squeeze=False)
    for ax, key in zip(axes[0], swept):
        values = sorted({str(r.get(key)) for r in rows})
        for i, v in enumerate(values):
            ys = [r[metric] for r in rows if str(r.get(key)) == v and isinstance(r.get(metric), (int, float))]
            ax.scatter([i] * len(ys), ys, color="C0")
            if ys:
                ax.plot([i - 0.2, i + 0.2], [sum(ys) / len(ys)] * 2, color="C1")
        ax.set_xticks(range(len(values)), values, rotation=30)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(cfg: DictConfig) -> dict[str, Path]:
    """The command on a composed ``conf/summarize.yaml``: write the summary, print the table."""
    out = write_summary(cfg.dir, cfg.metric)
    print(Path(out["md"]).read_text())
    print("written:", ", ".join(str(p) for p in out.values()))
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="summarize")
def _summarize_main(cfg: DictConfig) -> None:
    with exit_on_bad_input():
        run(cfg)


def main() -> None:
    _summarize_main()


if __name__ == "__main__":
    main()
