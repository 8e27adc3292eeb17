"""results.json -> the printed table and results.md; model FLOP utilisation against the run's own peaks."""

from __future__ import annotations

__all__ = ["add_mfu", "failures", "to_markdown"]


def add_mfu(results: dict) -> None:
    """``mfu_pct`` of every timed training row: achieved TFLOP/s over the matmul peak of its precision
    (bf16 rows: the bf16 peak; fp32 rows: the tf32 peak, cuDNN's default for fp32 convolutions, else fp32)."""
    peaks = results["sections"].get("env", {}).get("peak_tflops") or {}
    for name, sec in results["sections"].items():
        if not name.startswith("speed_"):
            continue
        for row in sec.get("rows", []):
            peak = peaks.get("bf16") if row.get("bf16") else peaks.get("tf32", peaks.get("fp32"))
            if "achieved_tflops" in row and peak:
                row["mfu_pct"] = round(100 * row["achieved_tflops"] / peak, 1)


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


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return lines


def to_markdown(results: dict) -> str:
    s = results["sections"]
    env = s.get("env", {})
    pk = env.get("peak_tflops", {})
    lines = [
        f"# make gpu-check: {results['device']}{' (--tiny)' if results['tiny'] else ''}",
        "",
        f"`{results['command']}`, {results['started']}, {results['wall_seconds']} s in all.",
        "",
    ]
    if results["tiny"]:
        lines += [
            "Toy sizes (`--tiny`): these numbers check that the command works, they measure nothing.",
            "",
        ]
    if results["device"] == "cpu":
        lines += ["A CPU run: the GPU path (`trainer=gpu`, NCCL DDP) is not measured by it.", ""]
    pkgs = env.get("packages", {})
    lines += _table(
        ["device", "memory GiB", "torch", "CUDA", "Lightning", "peak TFLOP/s (bf16 / tf32 / fp32)"],
        [
            [
                env.get("gpu") or env.get("cpu"),
                env.get("gpu_memory_gib"),
                pkgs.get("torch"),
                env.get("torch_cuda"),
                pkgs.get("lightning"),
                " / ".join(str(pk.get(k, "-")) for k in ("bf16", "tf32", "fp32")),
            ]
        ],
    )
    lines += ["", "## Training throughput (one optimizer step, batch and noise on the device)", ""]
    rows = []
    for name, sec in s.items():
        if not name.startswith("speed_"):
            continue
        if sec.get("status") == "skipped":
            rows.append([name[6:], "", "", "skipped: " + str(sec.get("reason", "")), "", "", "", "", "", ""])
            continue
        for r in sec.get("rows", []):
            if "skipped" in r:
                rows.append(
                    [sec.get("model"), "", "", r.get("setup"), "skipped: " + r["skipped"], "", "", "", "", ""]
                )
                continue
            rows.append(
                [
                    sec.get("model"),
                    f"{sec.get('parameters', 0) / 1e6:.1f}M",
                    sec.get("gflop_per_image_train"),
                    r.get("setup"),
                    r.get("images_per_s"),
                    r.get("vs_fp32_eager"),
                    r.get("achieved_tflops"),
                    r.get("mfu_pct"),
                    r.get("first_step_s"),
                    r.get("peak_memory_gib"),
                ]
            )
        if sec.get("status") in ("error", "timeout"):
            rows.append(
                [
                    sec.get("model", name[6:]),
                    "",
                    "",
                    sec.get("status"),
                    sec.get("error", ""),
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
    lines += _table(
        [
            "model",
            "params",
            "GFLOP/img (fwd+bwd)",
            "setup",
            "img/s",
            "vs fp32",
            "TFLOP/s",
            "MFU %",
            "first step s",
            "mem GiB",
        ],
        rows,
    )
    lines += [
        "",
        "Setups: fp32 eager = 32-true, NCHW, foreach AdamW (torch's default); bf16 eager = bf16-mixed "
        "autocast, channels_last (U-Nets); trainer=gpu = the same plus torch.compile (its first step "
        "includes the compile); + fused AdamW = the same model with AdamW(fused=True), which Lightning "
        "refuses beside gradient clipping under mixed precision. MFU: forward FLOPs (FlopCounterMode) x 3 "
        "per image against this run's matmul peak of the precision.",
    ]
    t = s.get("training", {})
    lines += ["", "## experiment=cifar10_ddpm-shaped training (digits as 3x32x32, train() + Lightning)", ""]
    lines += _table(
        [
            "status",
            "steps",
            "seconds (incl. compile)",
            "img/s (ThroughputMonitor)",
            "loss first fifth -> last fifth",
            "reloaded model loss",
        ],
        [
            [
                t.get("status"),
                t.get("global_step"),
                t.get("train_seconds"),
                t.get("lightning_images_per_s_last"),
                f"{t.get('loss_first_fifth')} -> {t.get('loss_last_fifth')}",
                t.get("reloaded_model_loss"),
            ]
        ],
    )
    sp = s.get("sampling", {})
    lines += ["", f"## Sampling (unet_cifar, batch {sp.get('batch')})", ""]
    lines += _table(
        ["sampler", "precision", "NFE", "img/s", "s per batch"],
        [
            [r.get(k) for k in ("sampler", "precision", "nfe", "images_per_s", "seconds_per_batch")]
            for r in sp.get("rows", [])
        ],
    )
    f = s.get("fid", {})
    lines += ["", "## FID plumbing", ""]
    lines += [
        f"Classifier (1 epoch, accuracy {f.get('classifier_accuracy_1_epoch')}) features on "
        f"{f.get('device_of_features')}: FID real/real {f.get('fid_classifier_real_vs_real')}, "
        f"noise/real {f.get('fid_classifier_noise_vs_real')}; metrics in {f.get('metric_seconds')} s. "
        f"Inception: {f.get('inception')}.",
    ]
    lines += ["", "## DDP", ""]
    rows = []
    for name in ("ddp", "ddp_compile"):
        d = s.get(name, {})
        rows.append(
            [
                name,
                d.get("status"),
                d.get("strategy"),
                d.get("world_size"),
                d.get("global_step"),
                d.get("seconds"),
                d.get("reason", d.get("error", "")),
            ]
        )
    lines += _table(["section", "status", "strategy", "world size", "steps", "seconds", "note"], rows)
    lines += ["", "## Sections", ""]
    lines += _table(
        ["section", "status", "seconds", "error"],
        [[n, v.get("status"), v.get("seconds"), v.get("error", v.get("reason", ""))] for n, v in s.items()],
    )
    fails = failures(results)
    lines += ["", "## Failures", ""] + ([f"- {x}" for x in fails] or ["none"])
    return "\n".join(lines) + "\n"
