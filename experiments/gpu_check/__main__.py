"""python -m experiments.gpu_check [--device cuda|cpu] [--tiny] [--out DIR] [--budget SECONDS] [--only ...]

Runs every section in its own subprocess (``--section NAME``) under a time limit and a budget for the whole
run, then writes ``results.json`` and ``results.md`` to ``--out`` (after every section) and prints the
tables. Exit status 1 when a section errored, timed out or failed a check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name -> (time limit on the GPU in s, on the CPU with --tiny, optional), in order of priority. The GPU limits
# add up to more than the default budget: they bound a section that hangs; the budget bounds the run (a
# section is skipped when under 20 s are left, an optional one when less than its limit is left).
SECTIONS: dict[str, tuple[int, int, bool]] = {
    "env": (60, 120, False),
    "training": (200, 180, False),  # first after env: the real trainer=gpu path matters most (cold compile)
    "sampling": (60, 120, False),
    "fid": (60, 120, False),
    "ddp": (90, 180, False),
    "speed_unet_cifar": (150, 120, False),
    "speed_unet_small": (100, 120, False),
    "speed_dit": (100, 120, False),
    "ddp_compile": (150, 60, True),
}


def _run_section(name: str, ctx) -> None:
    from experiments.gpu_check.common import Record, first_line

    rank = int(os.environ.get("LOCAL_RANK", "0") or 0)  # Lightning's DDP ranks rerun this command
    suffix = "" if rank == 0 else f".rank{rank}"
    rec = Record(ctx.out / "sections" / f"{name}{suffix}.json", section=name)
    start = time.perf_counter()
    try:
        if name == "env":
            from experiments.gpu_check.env import run_env

            run_env(ctx, rec)
        elif name.startswith("speed_"):
            from experiments.gpu_check.speed import dit_model_name, run_speed

            model = dit_model_name() if name == "speed_dit" else name[len("speed_") :]
            run_speed(ctx, rec, model)
        elif name == "training":
            from experiments.gpu_check.training import run_training

            run_training(ctx, rec)
        elif name == "sampling":
            from experiments.gpu_check.sampling import run_sampling

            run_sampling(ctx, rec)
        elif name == "fid":
            from experiments.gpu_check.sampling import run_fid

            run_fid(ctx, rec)
        elif name in ("ddp", "ddp_compile"):
            from experiments.gpu_check.ddp import run_ddp

            run_ddp(ctx, rec, compile=name == "ddp_compile")
        else:
            raise ValueError(f"unknown section '{name}'; choose from {', '.join(SECTIONS)}")
        if rec["status"] == "running":
            rec["status"] = "ok" if all(rec["checks"].values()) else "failed"
    except BaseException as e:  # noqa: B036 (a KeyboardInterrupt is recorded too)
        rec["status"] = "error"
        rec["error"] = first_line(e)
        rec["traceback"] = traceback.format_exc()[-6000:]
        print(rec["traceback"], file=sys.stderr, flush=True)
    rec["seconds"] = round(time.perf_counter() - start, 1)
    rec.save()
    sys.exit(0 if rec["status"] in ("ok", "skipped") else 1)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _child(name: str, args, limit: float) -> dict:
    """Run one section in a fresh process group; kill the group at ``limit`` seconds."""
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "sections").mkdir(parents=True, exist_ok=True)
    result_file = out / "sections" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    log = out / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", "experiments.gpu_check", "--section", name, "--device", args.device]
    cmd += ["--out", str(out), "--work", args.work] + ["--tiny"] * args.tiny
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    start = time.perf_counter()
    timed_out = False
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(
                proc.pid, signal.SIGKILL
            )  # the section and what it started (compile workers, DDP ranks)
            rc = proc.wait()
    seconds = round(time.perf_counter() - start, 1)
    try:
        rec = json.loads(result_file.read_text())
    except (OSError, ValueError):
        rec = {"checks": {}}
    if timed_out:
        rec["status"] = "timeout"
        rec["error"] = f"timed out after {limit:.0f} s (what it measured before is kept)"
    elif rec.get("status") in (None, "running"):
        last = [line for line in _tail(log, 5).splitlines() if line.strip()]
        rec["status"] = "error"
        rec["error"] = f"exit status {rc}: {last[-1] if last else 'no output'}"
    rec["wall_seconds"] = seconds
    rec.pop("traceback", None) if rec.get("status") == "ok" else None
    return rec


def _write(out: Path, results: dict) -> str:
    """results.json, then results.md (a bug in the report must not cost the measurements)."""
    from experiments.gpu_check.report import to_markdown

    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    try:
        md = to_markdown(results)
    except Exception as e:  # noqa: BLE001
        md = f"(results.md could not be written: {type(e).__name__}: {e}; see results.json)\n"
    (out / "results.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The GPU path, checked in a few minutes (make gpu-check).")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--tiny", action="store_true", help="toy sizes: the same code paths in seconds (CPU tests)"
    )
    p.add_argument("--out", default=str(REPO / "outputs" / "gpu_check"), help="results folder")
    p.add_argument(
        "--work",
        default=None,
        help="run folders, checkpoints, data cache (default: a new temporary folder, removed at the end)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the temporary --work folder")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (GPU 420, tiny 600)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=None, help="run only these sections")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # one section, in this process
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device {args.device}: choose cuda or cpu")
    out = Path(args.out).resolve()
    args.out = str(out)
    if args.section:
        import diffusion_lab  # noqa: F401 (first: the project's CPU settings and config resolvers)
        from experiments.gpu_check.common import Ctx

        _run_section(args.section, Ctx(args.device, args.tiny, out, Path(args.work)))
        return 0

    from experiments.gpu_check.report import add_mfu, failures

    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if own_work else Path(args.work).resolve()
    args.work = str(work)
    budget = args.budget or (600.0 if args.tiny else 420.0)
    command = "python -m experiments.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {
        "command": command.strip(),
        "device": args.device,
        "tiny": args.tiny,
        "budget_s": budget,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "sections": {},
        "failures": [],
    }
    start = time.perf_counter()
    for name, (gpu_limit, cpu_limit, optional) in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        left = budget - (time.perf_counter() - start)
        limit = min(cpu_limit if args.tiny else gpu_limit, left)
        if name == "ddp_compile" and args.tiny and args.device == "cpu":
            results["sections"][name] = {
                "status": "skipped",
                "reason": "compile off on CPU --tiny",
                "checks": {},
            }
            continue
        if limit < 20 or (optional and limit < (cpu_limit if args.tiny else gpu_limit)):
            results["sections"][name] = {
                "status": "skipped",
                "reason": f"time budget ({left:.0f} s left)",
                "checks": {},
            }
            print(f"== {name}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        print(f"== {name} (limit {limit:.0f} s)", flush=True)
        rec = _child(name, args, limit)
        results["sections"][name] = rec
        note = rec.get("error") or rec.get("reason") or ""
        print(f"   {rec['status']} in {rec['wall_seconds']} s {note}", flush=True)
        if rec["status"] not in ("ok", "skipped"):
            print("   " + _tail(out / "logs" / f"{name}.log").replace("\n", "\n   "), flush=True)
        results["wall_seconds"] = round(time.perf_counter() - start, 1)
        add_mfu(results)
        results["failures"] = failures(results)
        _write(out, results)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    add_mfu(results)
    results["failures"] = failures(results)
    print("\n" + _write(out, results), flush=True)
    if own_work and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)  # the temporary folder made above
    print(f"wrote {out / 'results.md'} and results.json ({results['wall_seconds']} s)", flush=True)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
