"""``make bench``: every benchmark section in one process run; writes results.json and results.md.

python -m experiments.bench [--seconds 2.5] [--repeats 3] [--only training sampling ...] [--no-compile]
    [--quality-ckpt CKPT --classifier PT --data-root HODA] [--hoda HODA] [--dit-models dit_tiny ...]
    [--out experiments/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import diffusion_lab  # noqa: F401, I001  (first: OpenMP's settings, before torch loads it)
from experiments.bench.machine import describe_machine
from experiments.bench.report import to_markdown

SECTIONS = (
    "peaks",
    "profile",
    "training",
    "numerics",
    "threads",
    "sampling",
    "quality",
    "peer",
    "loader",
    "dit",
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per timed slot")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per case (medians reported)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--numerics-steps", type=int, default=200)
    p.add_argument(
        "--one-thread",
        action="store_true",
        help="leave out the two-thread training rows (measure those on an idle machine)",
    )
    p.add_argument(
        "--threads-situations",
        nargs="+",
        default=["alone", "beside a busy process"],
        help="threads section: which situations to measure",
    )
    p.add_argument("--quality-ckpt", default=None, help="a trained checkpoint for the FID check")
    p.add_argument("--classifier", default=None, help="its dataset's digit classifier")
    p.add_argument("--data-root", default=None, help="where the checkpoint's dataset lives now")
    default_hoda = Path(os.environ.get("DIFFUSION_LAB_SHARED_DATA", "../shared/data")) / "hoda"
    p.add_argument("--hoda", default=str(default_hoda), help="Hoda files for the loader section")
    p.add_argument(
        "--dit-models",
        nargs="+",
        default=None,
        help="conf/model/dit_* sizes of the dit section (default: dit_tiny dit_tiny2 dit_s4 dit_s2)",
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of OUT/results.json that this run does not measure (a bench in parts)",
    )
    args = p.parse_args(argv)
    compile_ = not args.no_compile
    start = time.perf_counter()
    r: dict = {
        "args": " ".join(argv) if argv is not None else " ".join(os.sys.argv[1:]),
        "machine": describe_machine(),
    }
    print(json.dumps(r["machine"], indent=1))
    from experiments.bench.targets import describe_targets

    print(describe_targets(r["machine"]["cpu_kind"]))

    def section(name: str, fn) -> None:
        if name in args.only:
            print(f"\n== {name} ==", flush=True)
            t0 = time.perf_counter()
            r[name] = fn()
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    from experiments.bench.training import matmul_peaks, peak_shares, run_training

    section("peaks", matmul_peaks)
    if "profile" in args.only:
        from experiments.bench.profile import run_profile

        section("profile", lambda: run_profile(bf16=r["machine"]["bf16_units"]))
    bf16_units = r["machine"]["bf16_units"]
    section(
        "training",
        lambda: run_training(
            r.get("peaks", {}), args.seconds, args.repeats, compile_, bf16_units, not args.one_thread
        ),
    )
    if "numerics" in args.only:
        from experiments.bench.numerics import run_numerics

        section("numerics", lambda: run_numerics(steps=args.numerics_steps, bf16_units=bf16_units))
    if "threads" in args.only:
        from experiments.bench.threads import run_threads

        section(
            "threads",
            lambda: run_threads(
                seconds=max(args.seconds, 3.0), repeats=2, situations=tuple(args.threads_situations)
            ),
        )
    from experiments.bench.sampling import run_sampling_quality, run_sampling_speed

    section(
        "sampling",
        lambda: run_sampling_speed(
            seconds=args.seconds, repeats=args.repeats, compile_=compile_, bf16_units=bf16_units
        ),
    )
    if args.quality_ckpt and args.classifier:
        section(
            "quality",
            lambda: run_sampling_quality(
                args.quality_ckpt, args.classifier, args.data_root, compile_=compile_
            ),
        )
    elif "quality" in args.only:
        r["quality"] = {"skipped": "no --quality-ckpt/--classifier given"}
    if "peer" in args.only:
        from experiments.bench.peer import run_peer

        section("peer", lambda: run_peer(seconds=args.seconds, repeats=args.repeats))
    if "loader" in args.only:
        from experiments.bench.loader import run_loader

        section("loader", lambda: run_loader(args.hoda, None, min(args.seconds, 2.0)))

    if "dit" in args.only:
        from experiments.bench.dit import DEFAULT_MODELS, run_dit

        models = tuple(args.dit_models or DEFAULT_MODELS)
        section("dit", lambda: run_dit(r.get("peaks", {}), args.seconds, args.repeats, compile_, models))

    from experiments.bench.targets import evaluate_targets

    r["targets"] = evaluate_targets(r)
    for t in r["targets"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  target {t['target']}: wanted {t['wanted']}, measured {t['measured']} -> {met}")
    r["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    r["wall_minutes"] = round((time.perf_counter() - start) / 60, 1)
    out = Path(args.out)
    if args.merge and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        parts = old.get("parts") or [{k: old.get(k) for k in ("args", "wall_minutes", "load_average_at_end")}]
        parts.append({"args": r["args"], "wall_minutes": r["wall_minutes"], "sections": list(args.only)})
        r = {**old, **{k: v for k, v in r.items() if k in SECTIONS or k == "machine"}, "parts": parts}
        r["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        r["wall_minutes"] = round(sum(p.get("wall_minutes") or 0 for p in parts), 1)
        for row in r.get("training") or []:
            row.update(peak_shares(row, r.get("peaks") or {}))
        r["targets"] = evaluate_targets(r)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    (out / "results.md").write_text(to_markdown(r) + "\n")
    print(f"\nwrote {out / 'results.md'} and results.json ({r['wall_minutes']} min)")


if __name__ == "__main__":
    main()
