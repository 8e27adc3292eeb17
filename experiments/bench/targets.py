"""The performance targets per kind of CPU (each against a reference measured in the same run) and whether
a results dict meets them.

Kinds: ``amx`` (AMX-BF16 tiles), ``avx512_bf16`` (AVX512-BF16 without AMX), ``avx2`` (no bf16 units: fp32
training, the CPU trainer's precision rule). The thread targets hold on every kind.
"""

from __future__ import annotations

__all__ = ["cpu_kind", "TARGETS", "evaluate_targets"]


def cpu_kind(flags: frozenset[str]) -> str:
    """``amx``, ``avx512_bf16`` or ``avx2`` (everything without x86 bf16 units) from /proc/cpuinfo flags."""
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx2"


# kind -> (unet_small training: precision, minimum % of that precision's 1-thread matmul peak;
#          unet_tiny 32 px: minimum speed-up of the fastest setup over the reference, which setup, reference)
TARGETS: dict[str, dict] = {
    "amx": {"small_precision": "bf16", "small_pct": 35.0, "tiny_speedup": 3.0, "tiny_ref": "fp32"},
    "avx512_bf16": {"small_precision": "bf16", "small_pct": 75.0, "tiny_speedup": 2.0, "tiny_ref": "fp32"},
    "avx2": {"small_precision": "fp32", "small_pct": 85.0, "tiny_speedup": 1.3, "tiny_ref": "fp32"},
}
THREADS_IDLE = 1.6  # train.py's default thread setting vs one thread, idle 2-core machine
THREADS_BUSY = 1.0  # the same, beside a busy process


def _row(name: str, target: str, value, met: bool | None, note: str = "") -> dict:
    return {"target": name, "wanted": target, "measured": value, "met": met, "note": note}


def evaluate_targets(r: dict) -> list[dict]:
    """One row per target of this CPU's kind (and the thread targets) with the measured value; ``met`` is
    None where the section that measures it did not run."""
    kind = r["machine"]["cpu_kind"]
    t = TARGETS[kind]
    rows = []
    train = r.get("training") or []
    small = [x for x in train if x["model"] == "unet_small" and x["key"].startswith(t["small_precision"])]
    if small:
        # one thread: images per CPU-second against the peak by CPU time (steady on a shared machine)
        best = max(small, key=lambda x: x.get("pct_of_matmul_peak_cpu_time") or 0)
        pct = best.get("pct_of_matmul_peak_cpu_time")
        rows.append(
            _row(
                f"unet_small 32 px {t['small_precision']} training, % of the 1-thread "
                f"{t['small_precision']} matmul peak",
                f">= {t['small_pct']}%",
                pct,
                pct is not None and pct >= t["small_pct"],
                f"best setup: {best['setup']}",
            )
        )
    else:
        rows.append(_row("unet_small training vs peak", f">= {t['small_pct']}%", None, None, "not measured"))
    tiny = [x for x in train if x["model"] == "unet_tiny" and x["image_size"] == 32 and "2t" not in x["key"]]
    wanted = [x for x in tiny if (kind != "avx2" or "compile" in x["key"])]
    if wanted:
        best = max(wanted, key=lambda x: x["vs_reference_cpu"])
        what = "compiled vs eager fp32" if kind == "avx2" else "fastest setup vs fp32"
        rows.append(
            _row(
                f"unet_tiny 32 px training, {what} (1 thread, per CPU-second)",
                f">= {t['tiny_speedup']}x",
                best["vs_reference_cpu"],
                best["vs_reference_cpu"] >= t["tiny_speedup"],
                f"best setup: {best['setup']}; by wall clock {best['vs_reference']}x",
            )
        )
    else:
        rows.append(_row("unet_tiny speed-up", f">= {t['tiny_speedup']}x", None, None, "not measured"))
    threads = r.get("threads") or []
    from experiments.bench.threads import DEFAULT_CASE

    for situation, want in (("alone", THREADS_IDLE), ("beside a busy process", THREADS_BUSY)):
        got = [x for x in threads if x["situation"] == situation and x["case"] == DEFAULT_CASE]
        name = f"threads: train.py's default vs 1 thread, {situation}"
        if got:
            v = got[0]["vs_one_thread"]
            load, idle = got[0].get("load_average_before"), got[0].get("idle_cores_before")
            note = f"{got[0]['threads']} thread(s); before: load average {load}, idle cores {idle}"
            met = v >= want
            if situation == "alone" and idle is not None and idle < 1.7:
                met, note = None, note + "; the machine was not idle: not a measurement of this target"
            rows.append(_row(name, f">= {want}x", v, met, note))
        else:
            rows.append(_row(name, f">= {want}x", None, None, "not measured"))
    return rows


def describe_targets(kind: str) -> str:
    """One line: the kind of CPU found and the targets that apply to it."""
    t = TARGETS[kind]
    units = {
        "amx": "AMX-BF16 tiles",
        "avx512_bf16": "AVX512-BF16 (no AMX)",
        "avx2": "no bf16 units (AVX2): fp32",
    }[kind]
    tiny = "compiled vs eager fp32" if kind == "avx2" else "fastest setup vs fp32"
    return (
        f"CPU kind: {kind} ({units}); targets: unet_small {t['small_precision']} training >= "
        f"{t['small_pct']}% of the 1-thread {t['small_precision']} matmul peak, unet_tiny 32 px {tiny} >= "
        f"{t['tiny_speedup']}x, threads (train.py's default) >= {THREADS_IDLE}x one thread alone and >= "
        f"{THREADS_BUSY}x beside a busy process"
    )
