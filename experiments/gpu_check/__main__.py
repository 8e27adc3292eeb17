"""python -m experiments.gpu_check [--device cuda|cpu] [--tiny] [--out DIR] [--budget-s SECONDS] [--only ...]
                               [--in-process]

Runs the sections in order of priority, each in its own subprocess (``--section NAME``) under its time limit
and the budget for the whole run (a section that would not fit in what is left is skipped, the reason
recorded), and writes ``results.json`` and ``results.md`` to ``--out`` at the start and after every section
(each write whole or not at all), then prints the tables. Exit status 1 when a section errored, timed out or
failed a check.
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_GPU = 400.0  # s: with the machine's start-up, about 8 minutes of device time in one call
DEFAULT_BUDGET_TINY = 900.0


@dataclass(frozen=True)
class Section:
    """A section's time limit on the GPU and on the CPU at toy size (it is killed there), and the least time
    it needs to be worth starting (``need``, GPU / toy): with less of the budget left it is skipped, the
    reason recorded. ``optional``: outside the issue's list, run only where time is left over."""

    gpu_limit: int
    cpu_limit: int
    gpu_need: int
    cpu_need: int
    optional: bool = False


# In order of priority (issue 35): whatever the budget cuts, it cuts from the end.
SECTIONS: dict[str, Section] = {
    "env": Section(60, 120, 15, 10),  # environment, matmul peaks, what GroupNorm does on this build
    "roundtrip": Section(120, 240, 45, 30),  # bf16 vs fp32 train(); load_module(map_location=cuda) + bf16
    "eager_unet_cifar": Section(150, 300, 45, 30),  # {fp32, bf16} x {NCHW, NHWC}, the norm fix, profiles
    "overhead": Section(240, 300, 120, 30),  # train() (trainer=gpu) against the bare compiled step
    "syncs": Section(90, 180, 35, 20),  # host syncs per step by call site
    "dit": Section(180, 240, 80, 30),  # DiT-S/2 and DiT-B/2 compiled bf16
    "sampling": Section(120, 240, 35, 20),  # every precision
    "fid": Section(60, 120, 40, 20, optional=True),
    "ddp": Section(90, 180, 60, 30, optional=True),
}


def _run_section(name: str, ctx) -> None:
    from experiments.gpu_check.common import Record, first_line

    rank = int(os.environ.get("LOCAL_RANK", "0") or 0)  # Lightning's DDP ranks rerun this command
    suffix = "" if rank == 0 else f".rank{rank}"
    rec = Record(ctx.out / "sections" / f"{name}{suffix}.json", section=name)
    start = time.perf_counter()
    try:
        if name != "env":  # env records the settings before and after
            from diffusion_lab.utils.device import configure_gpu

            rec["configure_gpu"] = configure_gpu(ctx.device)
        if name == "env":
            from experiments.gpu_check.env import run_env

            run_env(ctx, rec)
        elif name == "roundtrip":
            from experiments.gpu_check.roundtrip import run_roundtrip

            run_roundtrip(ctx, rec)
        elif name == "eager_unet_cifar":
            from experiments.gpu_check.speed import run_eager

            run_eager(ctx, rec)
        elif name == "overhead":
            from experiments.gpu_check.overhead import run_overhead

            run_overhead(ctx, rec)
        elif name == "syncs":
            from experiments.gpu_check.syncs import run_syncs

            run_syncs(ctx, rec)
        elif name == "dit":
            from experiments.gpu_check.speed import run_dit

            run_dit(ctx, rec)
        elif name == "sampling":
            from experiments.gpu_check.sampling import run_sampling

            run_sampling(ctx, rec)
        elif name == "fid":
            from experiments.gpu_check.sampling import run_fid

            run_fid(ctx, rec)
        elif name == "ddp":
            from experiments.gpu_check.ddp import run_ddp

            run_ddp(ctx, rec)
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
    cmd += ["--out", str(out), "--work", args.work, "--deadline", f"{time.time() + limit:.1f}"]
    cmd += ["--tiny"] * args.tiny
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


def _in_process(name: str, args, limit: float) -> dict:
    """``--in-process`` (toy sizes only): the section in this process, saving the process starts of a CPU
    test run. Nothing kills it at its limit (the section still sees its deadline); ``ddp`` always runs in
    its own process, since Lightning's DDP ranks rerun the command."""
    from experiments.gpu_check.common import Ctx

    out = Path(args.out)
    result_file = out / "sections" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        _run_section(name, Ctx(args.device, args.tiny, out, Path(args.work), time.time() + limit))
    except SystemExit:
        pass  # the section's exit status is in its record
    try:
        rec = json.loads(result_file.read_text())
    except (OSError, ValueError):
        rec = {"checks": {}, "status": "error", "error": "the section left no record"}
    rec["wall_seconds"] = round(time.perf_counter() - start, 1)
    rec.pop("traceback", None) if rec.get("status") == "ok" else None
    return rec


def _write_atomic(path: Path, text: str) -> None:
    """A whole file or none: a kill during the write leaves the previous version."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write(out: Path, results: dict) -> str:
    """results.json, then results.md (a bug in the report must not cost the measurements)."""
    from experiments.gpu_check.report import to_markdown

    _write_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    try:
        md = to_markdown(results)
    except Exception as e:  # noqa: BLE001
        md = f"(results.md could not be written: {type(e).__name__}: {e}; see results.json)\n"
    _write_atomic(out / "results.md", md)
    return md


def _skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "checks": {}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The GPU path, checked in about 8 minutes (make gpu-check).")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--tiny", action="store_true", help="toy sizes: every section's code path in minutes (CPU tests)"
    )
    p.add_argument("--out", default=str(REPO / "outputs" / "gpu_check"), help="results folder")
    p.add_argument(
        "--work",
        default=None,
        help="run folders, checkpoints, data cache (default: a new temporary folder, removed at the end)",
    )
    p.add_argument("--keep-work", action="store_true", help="keep the temporary --work folder")
    p.add_argument(
        "--budget-s",
        "--budget",
        dest="budget",
        type=float,
        default=None,
        help=f"seconds for the whole run (default GPU {DEFAULT_BUDGET_GPU:.0f}, --tiny "
        f"{DEFAULT_BUDGET_TINY:.0f}); a section that would not fit in what is left is skipped, "
        "the reason recorded",
    )
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=None, help="run only these sections")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="with --tiny on the CPU: every section but ddp in this process (no per-section time limit)",
    )
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # one section, in this process
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # its time.time() limit
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device {args.device}: choose cuda or cpu")
    out = Path(args.out).resolve()
    args.out = str(out)
    if args.section:
        from diffusion_lab.utils.cpu import configure_cpu, register_resolvers

        # before torch loads: OpenMP's waiting threads sleep (utils/cpu.py); a toy run on one thread (on a
        # shared CPU a second thread on a busy core slows every step)
        configure_cpu(threads=1 if args.tiny and args.device == "cpu" else None, warn=False)
        register_resolvers()  # ${cpu_precision:} in configs composed here
        from experiments.gpu_check.common import Ctx

        _run_section(args.section, Ctx(args.device, args.tiny, out, Path(args.work), args.deadline))
        return 0

    if args.in_process:
        if not (args.tiny and args.device == "cpu"):
            p.error("--in-process runs toy sizes on the CPU only: add --tiny --device cpu")
        from diffusion_lab.utils.cpu import configure_cpu, register_resolvers

        configure_cpu(threads=1, warn=False)  # as each section's own process would (see --section above)
        register_resolvers()

    from experiments.gpu_check.report import add_mfu, failures

    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if own_work else Path(args.work).resolve()
    args.work = str(work)
    budget = args.budget or (DEFAULT_BUDGET_TINY if args.tiny else DEFAULT_BUDGET_GPU)
    command = "python -m experiments.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {
        "command": command.strip(),
        "device": args.device,
        "tiny": args.tiny,
        "budget_s": budget,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": 0.0,
        "sections": {},
        "failures": [],
    }
    start = time.perf_counter()

    def save(running: str | None = None) -> str:
        results["running"] = running
        results["wall_seconds"] = round(time.perf_counter() - start, 1)
        add_mfu(results)
        results["failures"] = failures(results)
        return _write(out, results)

    save()  # a valid results.json from the start: a kill at any moment leaves the sections finished so far
    for name, sec in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        left = budget - (time.perf_counter() - start)
        limit = min(sec.cpu_limit if args.tiny else sec.gpu_limit, left)
        need = sec.cpu_need if args.tiny else sec.gpu_need
        if left < need or (sec.optional and not args.only and left < limit + need):
            results["sections"][name] = _skipped(
                f"time budget: {max(left, 0):.0f} s left of {budget:.0f}, the section needs about {need} s"
            )
            print(f"== {name}: skipped, {max(left, 0):.0f} s of the budget left", flush=True)
            save()
            continue
        print(f"== {name} (limit {limit:.0f} s)", flush=True)
        save(running=name)
        run = _in_process if args.in_process and name != "ddp" else _child
        rec = run(name, args, limit)
        results["sections"][name] = rec
        note = rec.get("error") or rec.get("reason") or ""
        print(f"   {rec['status']} in {rec['wall_seconds']} s {note}", flush=True)
        if rec["status"] not in ("ok", "skipped"):
            print("   " + _tail(out / "logs" / f"{name}.log").replace("\n", "\n   "), flush=True)
        save()
    print("\n" + save(), flush=True)
    if own_work and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)  # the temporary folder made above
    print(f"wrote {out / 'results.md'} and results.json ({results['wall_seconds']} s)", flush=True)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
