"""results.json -> the printed tables and results.md; model FLOP utilisation against the run's own peaks; the
targets of issue 35 with their measured values."""

from __future__ import annotations

from typing import Any

__all__ = ["add_mfu", "failures", "targets", "to_markdown", "TIMED_SECTIONS"]

TIMED_SECTIONS = ("eager_unet_cifar", "overhead", "dit")  # sections whose rows are training steps


def add_mfu(results: dict) -> None:
    """``mfu_pct`` of every timed training row: achieved TFLOP/s over the matmul peak of its precision
    (bf16 rows: the bf16 peak; fp32 rows: the tf32 peak, cuDNN's default for fp32 convolutions, else fp32)."""
    peaks = results["sections"].get("env", {}).get("peak_tflops") or {}
    for name, sec in results["sections"].items():
        if name not in TIMED_SECTIONS and not name.startswith("speed_"):
            continue
        for row in sec.get("rows", []):
            peak = peaks.get("bf16") if row.get("bf16") else peaks.get("tf32", peaks.get("fp32"))
            if "achieved_tflops" in row and peak:
                # three significant digits: toy rows against a large peak are far below 0.05%
                row["mfu_pct"] = float(f"{100 * row['achieved_tflops'] / peak:.3g}")


def failures(results: dict) -> list[str]:
    """One line per section that errored, timed out or failed a check."""
    out = []
    for name, sec in results["sections"].items():
        if sec.get("status") in ("error", "timeout"):
            out.append(f"{name}: {sec.get('error', sec.get('status'))}")
        for check, ok in sec.get("checks", {}).items():
            if not ok:
                detail = sec.get("check_details", {}).get(check)
                out.append(f"{name}: check failed: {check}" + (f" ({detail})" if detail is not None else ""))
    return out


def _rows(results: dict, section: str) -> list[dict]:
    return [r for r in results["sections"].get(section, {}).get("rows", []) if "ms_per_step" in r]


def _best(rows: list[dict], key: str = "images_per_s") -> dict | None:
    return max(rows, key=lambda r: r.get(key) or 0.0, default=None)


def targets(results: dict) -> list[dict[str, Any]]:
    """Issue 35's targets on one H100 / H200: name, wanted, measured, met (None: not measured)."""
    s = results["sections"]
    out: list[dict[str, Any]] = []

    def add(name: str, wanted: str, measured: Any, met: bool | None, note: str = "") -> None:
        out.append({"target": name, "wanted": wanted, "measured": measured, "met": met, "note": note})

    ov = s.get("overhead", {})
    gap = ov.get("framework_overhead_pct")
    add(
        "train() step vs the bare compiled step",
        "within 10%",
        None if gap is None else f"+{gap}%",
        None if gap is None else gap <= 10,
    )
    bare = [r for r in _rows(results, "overhead") if r.get("setup", "").startswith("bare")]
    best = _best(bare, "mfu_pct")
    mfu = None if best is None else best.get("mfu_pct")
    add(
        "unet_cifar compiled bf16, share of the bf16 peak",
        ">= 25%",
        None if mfu is None else f"{mfu}%",
        None if mfu is None else mfu >= 25,
        "" if best is None else best.get("setup", ""),
    )
    dit_b = next((r for r in _rows(results, "dit") if r.get("model") == "dit_b2"), None)
    mfu = None if dit_b is None else dit_b.get("mfu_pct")
    add(
        "DiT-B/2 compiled bf16, share of the bf16 peak",
        ">= 40%",
        None if mfu is None else f"{mfu}%",
        None if mfu is None else mfu >= 40,
    )
    eager = _rows(results, "eager_unet_cifar")
    b16 = _best([r for r in eager if r.get("bf16")])
    f32 = _best([r for r in eager if not r.get("bf16")])
    ratio = None if not (b16 and f32) else round(b16["images_per_s"] / f32["images_per_s"], 2)
    add(
        "unet_cifar bf16 eager vs fp32 eager (best layouts)",
        ">= 1.2x",
        None if ratio is None else f"{ratio}x",
        None if ratio is None else ratio >= 1.2,
        "" if b16 is None else f"{b16['setup']} vs {f32['setup']}",
    )
    samp = [r for r in _rows(results, "sampling") if r.get("sampler", "").startswith("DPM")]
    s32 = next((r for r in samp if r.get("precision") == "fp32"), None)
    s16 = _best([r for r in samp if r.get("precision") != "fp32"])
    ratio = None if not (s16 and s32) else round(s16["images_per_s"] / s32["images_per_s"], 2)
    add(
        "bf16 sampling vs fp32 sampling (DPM-Solver++ 20)",
        ">= 1.0x",
        None if ratio is None else f"{ratio}x",
        None if ratio is None else ratio >= 1.0,
        "" if s16 is None else s16["precision"],
    )
    sy = s.get("syncs", {})
    per = sy.get("syncs_per_plain_step")
    add(
        "host syncs in a step that does not log",
        "0",
        per,
        None if per is None else per == 0,
        ", ".join(list(sy.get("sites_plain_steps", {}))[:3]),
    )
    return out


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return lines


def _memory(r: dict) -> str:
    keys = ("first_step_peak_gib", "first_steps_peak_gib", "steady_peak_gib", "steady_reserved_gib")
    vals = [r.get(k) for k in keys if r.get(k) is not None]
    return " / ".join(str(v) for v in vals)


def _timed(r: dict) -> list:
    flag = " (clocks disagree)" if r.get("clocks_disagree") else ""
    return [
        r.get("images_per_s"),
        f"{r.get('ms_per_step')}{flag}",
        r.get("clock_gap_pct"),
        r.get("mfu_pct"),
        r.get("first_step_s"),
        _memory(r),
        r.get("syncs_in_timed_loop"),
    ]


TIMED_HEADER = [
    "img/s",
    "ms/step (median of 3)",
    "events vs host %",
    "MFU %",
    "first step s",
    "mem GiB: first / steady peak / reserved",
    "syncs in loop",
]


def _skip_line(name: str, sec: dict) -> list[str]:
    if sec.get("status") in ("skipped", "error", "timeout"):
        return ["", f"**{name}: {sec['status']}**: {sec.get('reason') or sec.get('error', '')}"]
    return []


def to_markdown(results: dict) -> str:
    s = results["sections"]
    env = s.get("env", {})
    pk = env.get("peak_tflops", {})
    lines = [
        f"# make gpu-check: {results['device']}{' (--tiny)' if results['tiny'] else ''}",
        "",
        f"`{results['command']}`, {results['started']}, {results['wall_seconds']} s of a "
        f"{results.get('budget_s', '?')} s budget.",
        "",
    ]
    if results["tiny"]:
        lines += [
            "Toy sizes (`--tiny`): these numbers check that the command works, they measure nothing.",
            "",
        ]
    if results["device"] == "cpu":
        lines += ["A CPU run: the GPU path (`trainer=gpu`, CUDA graphs, NCCL DDP) is not measured by it.", ""]
    pkgs = env.get("packages", {})
    lines += _table(
        [
            "device",
            "memory GiB",
            "torch",
            "CUDA",
            "Lightning",
            "peak TFLOP/s (bf16 / tf32 / fp32)",
            "fp32 matmuls",
        ],
        [
            [
                env.get("gpu") or env.get("cpu"),
                env.get("gpu_memory_gib"),
                pkgs.get("torch"),
                env.get("torch_cuda"),
                pkgs.get("lightning"),
                " / ".join(str(pk.get(k, "-")) for k in ("bf16", "tf32", "fp32")),
                env.get("float32_matmul_precision"),
            ]
        ],
    )
    gn = env.get("group_norm")
    if gn:
        dtypes = gn.get("autocast_dtype", {})
        lines += [
            "",
            f"GroupNorm on this build: F.group_norm keeps NHWC: **{gn.get('keeps_nhwc')}**; under bf16 "
            f"autocast nn.GroupNorm gives {dtypes.get('nn.GroupNorm')}, the U-Net's GroupNorm "
            f"{dtypes.get('unet.GroupNorm')} (bf16 error against fp64: "
            f"{gn.get('bf16_error', 0):.4f} of the largest value; one bf16 rounding is 0.0039).",
        ]
    lines += _skip_line("env", env)

    lines += ["", "## Targets (issue 35)", ""]
    lines += _table(
        ["target", "wanted", "measured", "met", "note"],
        [
            [
                t["target"],
                t["wanted"],
                t["measured"],
                {True: "yes", False: "**no**", None: "not measured"}[t["met"]],
                t["note"],
            ]
            for t in targets(results)
        ],
    )

    if "roundtrip" in s:
        rt = s["roundtrip"]
        lines += ["", "## bf16-mixed against fp32 through train(), and the bf16 module round trip", ""]
        lines += _table(
            ["precision", "steps", "seconds", "loss first", "loss last"],
            [
                [
                    r.get("precision"),
                    r.get("steps"),
                    r.get("seconds"),
                    r.get("loss_first"),
                    r.get("loss_last"),
                ]
                for r in rt.get("rows", [])
            ],
        )
        if rt.get("bf16_vs_fp32_window_gaps") is not None:
            lines += [
                "",
                f"Relative loss gap bf16 vs fp32: per step at most {rt.get('bf16_vs_fp32_max_step_gap')}, "
                f"means of {rt.get('window')} steps {rt.get('bf16_vs_fp32_window_gaps')}. Reloaded with "
                f"map_location={results['device']} onto {rt.get('reloaded_on')}; "
                f"samples: {rt.get('samples')}.",
            ]
        lines += _skip_line("roundtrip", rt)

    if "eager_unet_cifar" in s:
        ea = s["eager_unet_cifar"]
        lines += [
            "",
            f"## unet_cifar eager training step (batch {ea.get('batch')}, "
            f"{ea.get('gflop_per_image_train')} GFLOP/img)",
            "",
        ]
        lines += _table(
            ["setup", "vs fp32 NCHW", *TIMED_HEADER],
            [[r.get("setup"), r.get("vs_fp32_nchw"), *_timed(r)] for r in ea.get("rows", [])],
        )
        for name, prof in (ea.get("profiles") or {}).items():
            if "top_ops" in prof:
                top = ", ".join(f"{o['op']} {o['pct']}%" for o in prof["top_ops"][:6])
                lines += [
                    "",
                    f"Profile, {name} ({prof['clock']} time, {prof['ms_per_step']} ms/step): casts "
                    f"{prof['casts_pct']}%, copies {prof['copies_pct']}%, "
                    f"GroupNorm {prof['group_norm_pct']}%; top: {top}.",
                ]
        lines += _skip_line("eager_unet_cifar", ea)

    if "overhead" in s:
        ov = s["overhead"]
        lines += ["", "## train() (trainer=gpu) against the bare compiled step", ""]
        lines += _table(
            ["setup", *TIMED_HEADER],
            [
                [r.get("setup"), *(_timed(r) if "ms_per_step" in r else ["skipped: " + r.get("skipped", "")])]
                for r in ov.get("rows", [])
            ],
        )
        if ov.get("framework_overhead_pct") is not None:
            lines += [
                "",
                f"Framework overhead: {ov['framework_overhead_pct']}% per step (the first step of train() "
                "includes the compile).",
            ]
        lines += _skip_line("overhead", ov)

    if "syncs" in s:
        sy = s["syncs"]
        lines += ["", "## Host syncs per training step (train(), by call site)", ""]
        if "syncs_per_plain_step" in sy:
            lines += [
                f"{sy.get('counter')}: {sy['syncs_per_plain_step']} per step that does not log "
                f"({sy['steps_counted']['plain']} steps), {sy['syncs_per_log_step']} per logging step "
                f"({sy['steps_counted']['log']} steps).",
                "",
            ]
            sites = [[k, v, "plain"] for k, v in sy.get("sites_plain_steps", {}).items()]
            sites += [[k, v, "log"] for k, v in sy.get("sites_log_steps", {}).items()]
            lines += _table(["call site", "count", "steps"], sites)
        lines += _skip_line("syncs", sy)

    if "dit" in s:
        dit = s["dit"]
        lines += ["", f"## DiT compiled bf16 (batch {dit.get('batch')}, {dit.get('image_size')} px)", ""]
        lines += _table(
            ["model", "params", "GFLOP/img", *TIMED_HEADER],
            [
                [
                    r.get("model"),
                    f"{r.get('parameters', 0) / 1e6:.1f}M",
                    r.get("gflop_per_image_train"),
                    *_timed(r),
                ]
                if "ms_per_step" in r
                else [r.get("model"), "", "", "skipped: " + r.get("skipped", "")]
                for r in dit.get("rows", [])
            ],
        )
        lines += _skip_line("dit", dit)

    if "sampling" in s:
        sp = s["sampling"]
        lines += ["", f"## Sampling (unet_cifar, batch {sp.get('batch')})", ""]
        lines += _table(
            ["sampler", "precision", "NFE", "img/s", "s per batch", "RMS gap to fp32", "syncs in loop"],
            [
                [
                    r.get(k)
                    for k in (
                        "sampler",
                        "precision",
                        "nfe",
                        "images_per_s",
                        "seconds_per_batch",
                        "rms_gap_to_fp32",
                        "syncs_in_timed_loop",
                    )
                ]
                if "ms_per_step" in r
                else [r.get("sampler"), r.get("precision"), "skipped: " + r.get("skipped", "")]
                for r in sp.get("rows", [])
            ],
        )
        lines += _skip_line("sampling", sp)

    f = s.get("fid", {})
    if f.get("status") == "ok":
        lines += ["", "## FID plumbing", ""]
        lines += [
            f"Classifier (1 epoch, accuracy {f.get('classifier_accuracy_1_epoch')}) features on "
            f"{f.get('device_of_features')}: FID real/real {f.get('fid_classifier_real_vs_real')}, "
            f"noise/real {f.get('fid_classifier_noise_vs_real')}; metrics in {f.get('metric_seconds')} s. "
            f"Inception: {f.get('inception')}.",
        ]
    d = s.get("ddp", {})
    if d.get("status") == "ok":
        lines += [
            "",
            f"## DDP: {d.get('strategy')}, world size {d.get('world_size')}, {d.get('global_step')} steps "
            f"in {d.get('seconds')} s",
        ]

    lines += [
        "",
        "Every timed row: the first step alone, warm-up steps untimed, then three repeats of at least ten "
        "steps (toy: one) between two synchronisations, by CUDA events (the median repeat) and the host "
        "clock (flagged past 3%); memory: the first steps' peak (with cuDNN's autotuning workspaces under "
        "benchmark=true), the steady peak after the allocator's cache is emptied and the counters reset, the "
        "reserved pool; host syncs counted inside the timed loop by call site. Profiles are separate runs. "
        "MFU: forward FLOPs (FlopCounterMode) x 3 per image against this run's matmul peak of the precision "
        "(fp32 rows: the tf32 peak).",
        "",
        "## Sections",
        "",
    ]
    lines += _table(
        ["section", "status", "seconds", "error or reason"],
        [
            [n, v.get("status"), v.get("seconds", v.get("wall_seconds")), v.get("error", v.get("reason", ""))]
            for n, v in s.items()
        ],
    )
    fails = failures(results)
    lines += ["", "## Failures", ""] + ([f"- {x}" for x in fails] or ["none"])
    return "\n".join(lines) + "\n"
