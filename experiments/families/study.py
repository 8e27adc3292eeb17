"""The families study: one set of trainings (``train.sh``), every measurement read from those checkpoints.

    bash experiments/families/train.sh /path/to/hoda /runs/fam            # 1,500 steps each, two at a time
    python -m experiments.families.study quality --model ddpm=/runs/fam/ddpm/checkpoints/last.ckpt ...
    python -m experiments.families.study ot --model flow=... --model flow_ot=...
    python -m experiments.families.study likelihood --model ddpm=... --n 256
    python -m experiments.families.study best --model ddpm=... --n 5000
    python -m experiments.families.study report

Every command takes ``--data-root`` (where the checkpoints' dataset lives now) and writes one JSON file per
model and measurement under ``--out`` (``results/<measurement>/<model>.json``), appending a row as soon as it
is scored and skipping rows already there, so that an interrupted run resumes and two processes can score
two models side by side. ``report`` writes ``results.md`` and the plots from whatever has been scored.

Measurements (samples of the EMA weights scored by :func:`diffusion_lab.metrics.reference.real_reference`:
FID on the digit classifier's features against every test digit, the class histogram):

* ``quality``: each model with Heun (Karras grid) and its family's other samplers at NFE 10, 20, 35 (Heun
  spends 2 steps - 1 evaluations, so 9, 19, 35), ``--n`` samples, sampling seeds 0, 1000, 2000 (``draw`` seeds
  batch i with seed + i: seeds 0, 1, 2 would share batches);
* ``best``: a model's best (sampler, NFE) of ``quality`` (lowest mean FID) at ``--n`` samples (5,000), its
  class shares against 1/10 +- 15% and a grid of its first 100 samples;
* ``ot``: Euler (uniform in t) at 2, 5, 10 steps and Heun 10 NFE, and the straightness of the learned ODE
  (Liu et al. 2023, Eq. 6: the mean over t of E ||(x_1 - x_0) - v(x_t, t)||^2 per dimension along 100 Euler
  steps, with the solution's own endpoints);
* ``likelihood``: bits/dim from the probability-flow ODE (dopri5, rtol = atol = 1e-5, one Rademacher probe;
  the DDPM family on 128 fixed Heun steps, see :func:`likelihood`) on ``--n`` seeded test digits, and the
  exact discrete bound where the family has one (``experiments/likelihood/measure.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from diffusion_lab.metrics.reference import real_reference
from diffusion_lab.processes.edm import EDMDiffusion
from diffusion_lab.processes.flow import FlowMatching
from diffusion_lab.sample import generate
from diffusion_lab.samplers import get_sampler
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.utils.media import save_grid

HERE = Path(__file__).resolve().parent
DISCRETE_ODE_STEPS = 128  # the DDPM family's probability-flow ODE: Heun on a fixed grid (see likelihood())
SEEDS = (0, 1000, 2000)
NFES = (10, 20, 35)
GRID = {
    "heun": "karras",
    "euler": "karras",
    "ddim": "uniform",
    "dpm_solver": "logsnr_uniform",
    "ddpm": "uniform",
    "euler_maruyama": "time_uniform",
}


def family_samplers(module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(samplers scored everywhere, candidates for "its best other sampler"): Heun, then Euler-Maruyama (SiT's
    SDE) for flows and interpolants; for the discrete family and EDM (on its discrete view) the better of
    DPM-Solver++(2M) and ancestral sampling at NFE 20, seed 0 (a probe row of each), scored everywhere; EDM
    also with Euler on the Karras grid (Karras et al. 2022 claim Heun beats it at equal NFE)."""
    if isinstance(module.diffusion, FlowMatching):
        return ("heun", "euler_maruyama"), ()
    if isinstance(module.diffusion, EDMDiffusion):  # and Euler on the same grid: EDM's Heun-vs-Euler claim
        return ("heun", "euler"), ("dpm_solver", "ddpm")
    return ("heun",), ("dpm_solver", "ddpm")


def steps_for(sampler: str, nfe: int) -> int:
    return (nfe + 1) // 2 if sampler == "heun" else nfe


# ---------------------------------------------------------------------------------------- the bookkeeping


class Rows:
    """One JSON file of rows per (measurement, model), written after every row."""

    def __init__(self, out: Path, measurement: str, model: str, meta: dict):
        self.path = out / "results" / measurement / f"{model}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.meta = {**old.get("meta", {}), **meta}
        self.rows: list[dict] = old.get("rows", [])

    def find(self, **key) -> dict | None:
        return next((r for r in self.rows if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))


def load_models(specs: list[str]) -> dict[str, tuple]:
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"error: --model takes NAME=CHECKPOINT, got {spec!r}")
        module, cfg, ckpt = load_module(path)
        models[name] = (module.eval(), cfg, ckpt, str(Path(path).resolve()))
    return models


def model_meta(module, cfg, ckpt, path) -> dict:
    return {
        "checkpoint": path,
        "global_step": ckpt.get("global_step"),
        "objective": f"{type(module.diffusion).__name__}({module.diffusion.extra_repr()})",
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "precision": str(cfg.trainer.get("precision")),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }


def open_rows(args, measurement: str, name: str, module, cfg, ckpt, path: str) -> tuple:
    """(the real reference of the model's dataset, its :class:`Rows` of ``measurement``); the rows' meta
    names the checkpoint, the data and the sampling batch size."""
    ref = real_reference(cfg, data_root=args.data_root)
    meta = {**model_meta(module, cfg, ckpt, path), **ref.meta, "batch_size": args.batch_size}
    return ref, Rows(args.out, measurement, name, meta)


def score_samples(ref, module, sampler: str, nfe: int, n: int, seed: int, batch_size: int, **opts):
    steps = steps_for(sampler, nfe)
    fn = partial(get_sampler(sampler), steps=steps, grid=opts.pop("grid", GRID[sampler]), **opts)
    start = time.perf_counter()
    fake, _, used = generate(module, fn, n, seed=seed, batch_size=batch_size)
    seconds = time.perf_counter() - start
    scores = ref.score(fake)
    row = {"sampler": sampler, "nfe": used, "steps": steps, "seed": seed, "n": n, **scores}
    row["sampling_seconds"] = round(seconds, 1)
    return row, fake


# ---------------------------------------------------------------------------------------- the measurements


def quality(args, models) -> None:
    for name, (module, cfg, ckpt, path) in models.items():
        ref, rows = open_rows(args, "quality", name, module, cfg, ckpt, path)
        if "floor" not in rows.meta:
            rows.meta["floor"] = {str(s): ref.floor(args.n, s)["fid_classifier"] for s in SEEDS}
        samplers, candidates = family_samplers(module)
        if candidates:
            probe = {}
            for sampler in candidates:
                row = rows.find(sampler=sampler, steps=steps_for(sampler, 20), seed=SEEDS[0], n=args.n)
                if row is None:
                    row, _ = score_samples(ref, module, sampler, 20, args.n, SEEDS[0], args.batch_size)
                    rows.add(row)
                print(f"{name:>12} probe {sampler} NFE 20: FID {row['fid_classifier']:.3f}", flush=True)
                probe[sampler] = row["fid_classifier"]
            samplers = (*samplers, min(probe, key=probe.get))
            rows.meta["other_sampler_probe"] = probe
        samplers = args.samplers or samplers
        for sampler in samplers:
            for nfe in args.nfe:
                for seed in args.seeds:
                    if rows.find(sampler=sampler, steps=steps_for(sampler, nfe), seed=seed, n=args.n):
                        continue
                    row, _ = score_samples(ref, module, sampler, nfe, args.n, seed, args.batch_size)
                    rows.add(row)
                    print(
                        f"{name:>12} {sampler:>14} NFE {row['nfe']:>3} seed {seed:>4}: "
                        f"FID {row['fid_classifier']:.3f} ({row['sampling_seconds']} s)",
                        flush=True,
                    )


def best_setting(out: Path, name: str) -> tuple[str, int, float]:
    """(sampler, requested NFE, mean FID) of the lowest mean FID of a model's quality rows."""
    data = json.loads((out / "results" / "quality" / f"{name}.json").read_text())
    groups: dict[tuple[str, int], list[float]] = {}
    for r in data["rows"]:
        groups.setdefault((r["sampler"], r["nfe"]), []).append(r["fid_classifier"])
    (sampler, nfe), fids = min(groups.items(), key=lambda kv: statistics.mean(kv[1]))
    return sampler, nfe, statistics.mean(fids)


def best(args, models) -> None:
    for name, (module, cfg, ckpt, path) in models.items():
        sampler, nfe, _ = best_setting(args.out, name)
        ref, rows = open_rows(args, "best", name, module, cfg, ckpt, path)
        if "floor" not in rows.meta:
            rows.meta["floor"] = ref.floor(args.n, 0)["fid_classifier"]
        if rows.find(sampler=sampler, nfe=nfe, n=args.n):
            continue
        row, fake = score_samples(ref, module, sampler, nfe, args.n, 0, args.batch_size)
        rows.add(row)
        save_grid(fake[:100], args.out / f"grid_{name}.png", nrow=10)
        print(
            f"{name:>12} best {sampler} NFE {row['nfe']} n {args.n}: FID {row['fid_classifier']:.3f}, "
            f"class shares {row['class_band']['shares']}",
            flush=True,
        )


@torch.no_grad()
def straightness(module, shape: tuple[int, ...], n: int, steps: int, seed: int, batch_size: int) -> dict:
    """Liu et al. 2023 (Eq. 6) on the model's probability-flow ODE in its own time t (data at t = 0): Euler in
    t from t1 (the top of ``ode_interval``) to t0 with ``steps`` uniform steps; S = mean over steps and
    samples of ||(x(t1) - x(t0)) / (t1 - t0) - v(x_t, t)||^2 / dim (0 for straight paths)."""
    d = module.diffusion
    t0, t1 = d.ode_interval()
    ts = torch.linspace(t1, t0, steps + 1, dtype=torch.float64)
    total, count = 0.0, 0
    for b, start in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - start)
        g = torch.Generator().manual_seed(seed + b)
        x = torch.randn(m, *shape, generator=g)
        x_start = x.clone()
        velocities = []
        for i in range(steps):
            t = torch.full((m,), float(ts[i]))
            v = d.velocity(module.model, x, t)
            velocities.append(v)
            x = x + float(ts[i + 1] - ts[i]) * v
        chord = (x_start - x) / float(t1 - t0)  # the straight line's velocity
        gaps = torch.stack([((chord - v) ** 2).flatten(1).mean(1) for v in velocities])
        total += float(gaps.mean(0).sum())
        count += m
    return {"straightness": total / count, "straightness_steps": steps, "straightness_n": n}


def ot(args, models) -> None:
    for name, (module, cfg, ckpt, path) in models.items():
        ref, rows = open_rows(args, "ot", name, module, cfg, ckpt, path)
        plan = [("euler", k, "time_uniform") for k in (2, 5, 10)] + [("heun", 10, "karras")]
        for sampler, nfe, grid in plan:
            for seed in args.seeds:
                if rows.find(sampler=sampler, steps=steps_for(sampler, nfe), seed=seed, n=args.n):
                    continue
                row, _ = score_samples(ref, module, sampler, nfe, args.n, seed, args.batch_size, grid=grid)
                row["grid"] = grid
                rows.add(row)
                print(
                    f"{name:>12} {sampler} {grid} NFE {row['nfe']} seed {seed}: "
                    f"FID {row['fid_classifier']:.3f}",
                    flush=True,
                )
        if "straightness" not in rows.meta:
            shape = (int(cfg.dataset.channels), int(cfg.dataset.image_size), int(cfg.dataset.image_size))
            rows.meta.update(straightness(module, shape, args.straight_n, 100, 0, args.batch_size))
            rows.save()
            print(f"{name:>12} straightness {rows.meta['straightness']:.4f}", flush=True)


def likelihood(args, models) -> None:
    from experiments.likelihood.measure import measure

    opts = argparse.Namespace(
        n=args.n,
        seed=0,
        divergence="hutchinson",
        n_probes=1,
        method="dopri5",
        rtol=1e-5,
        atol=1e-5,
        steps=None,
        device="cpu",
        batch_size=args.batch_size,
        data_root=args.data_root,
    )
    for name, (module, _, _, path) in models.items():
        target = args.out / "results" / "likelihood" / f"{name}.json"
        if target.exists():
            continue
        start = time.perf_counter()
        model_opts = opts
        if not isinstance(module.diffusion, (EDMDiffusion, FlowMatching)):
            # The discrete model's drift is piecewise constant in t (the network runs at the nearest of its T
            # steps): dopri5 at 1e-5 rejects step after step at the jumps and had not finished 256 images
            # after 21 minutes of one core. A fixed grid steps over them: Heun, DISCRETE_ODE_STEPS uniform.
            model_opts = argparse.Namespace(**{**vars(opts), "method": "heun", "steps": DISCRETE_ODE_STEPS})
        row = measure(name, path, model_opts)
        row["seconds"] = round(time.perf_counter() - start, 1)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(row, indent=1, default=str))
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}, default=str), flush=True)


# ---------------------------------------------------------------------------------------- the report


def _load(out: Path, measurement: str) -> dict[str, dict]:
    folder = out / "results" / measurement
    return (
        {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.exists() else {}
    )


def _mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _samplers(rows: list[dict]) -> list[str]:
    """Heun first, then the others in the order they were scored."""
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    return sorted(names, key=lambda s: (s != "heun", names.index(s)))


def report(args) -> None:
    lines = []
    q = _load(args.out, "quality")
    if q:
        lines += [
            "## Sample quality against NFE",
            "",
            "FID on the digit classifier's features against the 20,000 test digits, 1,000 samples, mean "
            "± standard deviation over sampling seeds 0, 1000, 2000 (EMA weights).",
            "",
            "| model | sampler | NFE 9-10 | NFE 19-20 | NFE 35 |",
            "|---|---|---|---|---|",
        ]
        for name, data in q.items():
            for s in _samplers(data["rows"]):
                cells = []
                for nfe in NFES:
                    fids = [
                        r["fid_classifier"]
                        for r in data["rows"]
                        if r["sampler"] == s and r["steps"] == steps_for(s, nfe)
                    ]
                    cells.append(_mean_sd(fids))
                lines.append(f"| {name} | {s} | " + " | ".join(cells) + " |")
        floors = list(next(iter(q.values()))["meta"].get("floor", {}).values())  # the same for every model
        if floors:
            lines += ["", f"Floor (1,000 real test digits against all 20,000): FID {_mean_sd(floors)}."]
        _plot_quality(q, args.out / "fid_vs_nfe.png")
        lines += ["", "![FID against NFE](fid_vs_nfe.png)", ""]
    b = _load(args.out, "best")
    if b:
        lines += [
            "## Each family's best setting at 5,000 samples",
            "",
            "| model | sampler | NFE | FID | largest class deviation | classes outside 10% ± 15% | "
            "sampling s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, data in b.items():
            for r in data["rows"]:
                band = r["class_band"]
                lines.append(
                    f"| {name} | {r['sampler']} | {r['nfe']} | {r['fid_classifier']:.2f} | "
                    f"{100 * band['max_relative_deviation']:.0f}% | {band['outside_band'] or 'none'} | "
                    f"{r['sampling_seconds']} |"
                )
        floor = [d["meta"]["floor"] for d in b.values() if "floor" in d["meta"]]
        if floor:
            lines += ["", f"Floor (5,000 real test digits): FID {floor[0]:.2f}.", ""]
    o = _load(args.out, "ot")
    if o:
        lines += [
            "## Straight paths (OT-CFM)",
            "",
            "| model | Euler 2 | Euler 5 | Euler 10 | Heun 10 NFE (9) | straightness |",
            "|---|---|---|---|---|---|",
        ]
        for name, data in o.items():
            cells = []
            for s, nfe in (("euler", 2), ("euler", 5), ("euler", 10), ("heun", 10)):
                fids = [
                    r["fid_classifier"]
                    for r in data["rows"]
                    if r["sampler"] == s and r["steps"] == steps_for(s, nfe)
                ]
                cells.append(_mean_sd(fids))
            st = data["meta"].get("straightness")
            cells.append(f"{st:.4f}" if st is not None else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lk = _load(args.out, "likelihood")
    if lk:
        lines += [
            "## Likelihood",
            "",
            "| model | bits/dim, ODE (dopri5 1e-5) | NFE / image | s / image | bits/dim, discrete bound |",
            "|---|---|---|---|---|",
        ]
        for name, r in lk.items():
            ode = (
                f"{r['bpd_ode']:.3f} ± {r['bpd_ode_stderr']:.3f}"
                if "bpd_ode" in r
                else r.get("bpd_ode_error")
            )
            nfe = f"{r['bpd_ode_nfe']:.0f}" if "bpd_ode_nfe" in r else ""
            sec = f"{r['bpd_ode_seconds_per_image']:.2f}" if "bpd_ode_seconds_per_image" in r else ""
            bound = f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f}" if "bpd" in r else "n/a"
            lines.append(f"| {name} | {ode} | {nfe} | {sec} | {bound} |")
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _plot_quality(q: dict, path: Path) -> None:
    """FID against NFE: one colour per model, Heun solid, Euler dotted, the family's other sampler dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"heun": ("-", "o"), "euler": (":", "^")}
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for k, (name, data) in enumerate(q.items()):
        for s in _samplers(data["rows"]):
            pts = []
            for nfe in NFES:
                rs = [r for r in data["rows"] if r["sampler"] == s and r["steps"] == steps_for(s, nfe)]
                if rs:
                    pts.append((rs[0]["nfe"], statistics.mean(r["fid_classifier"] for r in rs)))
            if len(pts) > 1:  # the probe rows (one point) are in the table only
                line, marker = styles.get(s, ("--", "s"))
                ax.plot(*zip(*pts, strict=True), line, marker=marker, color=f"C{k}", label=f"{name} {s}")
    ax.set(
        xlabel="network evaluations per sample",
        ylabel="FID (classifier features), 1,000 samples",
        yscale="log",
        title="Hoda digits 32 px, unet_tiny, 1,500 steps each (mean of 3 seeds)",
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["quality", "best", "ot", "likelihood", "report"])
    p.add_argument("--model", action="append", default=[], help="NAME=CHECKPOINT (repeat)")
    p.add_argument("--data-root", default=None, help="where the checkpoints' dataset lives now")
    p.add_argument("--n", type=int, default=None, help="samples (quality/ot 1000, best 5000) or test digits")
    p.add_argument("--nfe", nargs="+", type=int, default=list(NFES))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--samplers", nargs="+", default=None, help="default: the family's (family_samplers)")
    p.add_argument("--straight-n", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)  # 35% faster per image than 500 on one core
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n is None:
        args.n = {"best": 5000, "likelihood": 256}.get(args.command, 1000)
    if args.command == "report":
        return report(args)
    if not args.model:
        p.error(f"{args.command} needs at least one --model NAME=CHECKPOINT")
    if args.command == "likelihood":
        args.batch_size = min(args.batch_size, 64)
    models = load_models(args.model)
    {"quality": quality, "best": best, "ot": ot, "likelihood": likelihood}[args.command](args, models)


if __name__ == "__main__":
    main()
