"""Bits/dim on test digits from the probability-flow ODE for each family, beside the discrete bound.

For every ``--ckpt FAMILY=PATH`` (``experiments/families`` runs it on the study's models) this scores
the same ``--n`` test images (a seeded random subset: Hoda's test split is stored sorted by class):

* ``bpd_ode``: the dequantized probability-flow ODE bits/dim (``diffusion_lab/processes/likelihood_ode.py``),
  an upper bound on the discrete model's NLL in expectation; dopri5 at rtol = atol = 1e-5 and one Rademacher
  probe per image by default (Song et al. 2021, App. D.2), with its standard error over images, the network
  evaluations per image and the seconds per image;
* ``bpd``: for objectives with the discrete bound (the DDPM family), the exact variational bound with the
  discretized decoder (all T terms + prior; the number ``metrics=[bpd]`` of ``diffusion_lab.evaluate``
  reports), also an upper bound, on the same images.

    python -m experiments.likelihood.measure --ckpt ddpm=<run>/checkpoints/last.ckpt \
        --ckpt edm=<run>/checkpoints/last.ckpt --ckpt flow=<run>/checkpoints/last.ckpt \
        --data-root /path/to/hoda --n 256

Writes ``results.json`` (one row per family) and ``table.md`` to ``--out``. A family whose objective has no
probability-flow ODE (no ``path()`` / ``velocity()``) gets its reason in the table instead of a number.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from diffusion_lab.evaluate import exact_bpd
from diffusion_lab.metrics.bpd_ode import ode_bpd_over_images
from diffusion_lab.training.checkpoint import load_module

HERE = Path(__file__).resolve().parent


def random_subset(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int):
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def measure(family: str, ckpt: str, args) -> dict:
    module, run_cfg, state = load_module(ckpt, ema=True)
    module.eval().to(args.device)
    with open_dict(run_cfg):
        if args.data_root:
            run_cfg.dataset.root = args.data_root
    dm = instantiate(run_cfg.dataset)
    dm.prepare_data()
    images, labels = random_subset(*dm.real_images("test"), args.n, args.seed)
    labels = labels if module.hparams.class_conditional else None
    row = {"family": family, "checkpoint": str(Path(ckpt).resolve()), "global_step": state.get("global_step")}
    row["objective"] = type(module.diffusion).__name__
    options = {
        "divergence": args.divergence,
        "n_probes": args.n_probes,
        "method": args.method,
        "rtol": args.rtol,
        "atol": args.atol,
        "steps": args.steps,
    }
    row["ode_options"] = options
    try:
        row.update(
            ode_bpd_over_images(
                module.diffusion,
                module.model,
                images,
                labels,
                args.batch_size,
                args.device,
                args.seed,
                options,
            )
        )
    except ValueError as err:  # no probability-flow ODE for this objective
        row["bpd_ode_error"] = str(err)
    if getattr(module.diffusion, "has_likelihood", True) and hasattr(module.diffusion, "bpd_bound"):
        start = time.perf_counter()
        y = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)
        mean, se = exact_bpd(module, images, y, args.batch_size, args.device, args.seed)
        row.update(bpd=mean, bpd_stderr=se, bpd_seconds_per_image=(time.perf_counter() - start) / len(images))
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| family | objective | step | bits/dim, ODE (upper bound) | NFE / image | s / image "
        "| bits/dim, discrete bound | s / image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "bpd_ode" in r:
            ode = f"{r['bpd_ode']:.3f} ± {r['bpd_ode_stderr']:.3f}"
            nfe, sec = f"{r['bpd_ode_nfe']:.0f}", f"{r['bpd_ode_seconds_per_image']:.2f}"
        else:
            ode, nfe, sec = f"n/a ({r.get('bpd_ode_error', '')[:60]}...)", "", ""
        bound = f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f}" if "bpd" in r else "n/a"
        bsec = f"{r['bpd_seconds_per_image']:.2f}" if "bpd" in r else ""
        cells = [r["family"], r["objective"], r["global_step"], ode, nfe, sec, bound, bsec]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", action="append", required=True, help="FAMILY=PATH, once per family")
    p.add_argument("--data-root", default=None, help="where the checkpoints' dataset lives now")
    p.add_argument("--n", type=int, default=256, help="test images per family")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--divergence", default="hutchinson", choices=["hutchinson", "exact"])
    p.add_argument("--n-probes", type=int, default=1)
    p.add_argument("--method", default="dopri5")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=None, help="fixed grid (with --method heun/euler/rk4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    rows = []
    for spec in args.ckpt:
        family, sep, path = spec.partition("=")
        if not sep:
            p.error(f"--ckpt takes FAMILY=PATH, got {spec!r}")
        rows.append(measure(family, path, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, dict)}, default=str))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "torch": torch.__version__, "n": args.n, "seed": args.seed}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (args.out / "table.md").write_text(table(rows))
    print(table(rows))
    if any(math.isnan(r.get("bpd_ode", 0.0)) for r in rows):
        print("warning: a NaN bits/dim (see results.json)")


if __name__ == "__main__":
    main()
