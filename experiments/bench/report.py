"""results.json -> results.md: one table per section, every ratio against a reference of the same run."""

from __future__ import annotations

from experiments.bench.targets import describe_targets

__all__ = ["to_markdown"]


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return out + [""]


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# `make bench` results",
        "",
        f"Written by `python -m experiments.bench {r['args']}` in {r['wall_minutes']} minutes. "
        "Every ratio compares cases measured in this one run, interleaved (medians of the repeats); absolute "
        "numbers depend on what else ran (load average "
        f"{m['load_average_at_start']} at the start, {r['load_average_at_end']} at the end, "
        f"on {m['cores']} cores). "
        '"per CPU-s" counts images per CPU-second of this process: with one thread it hardly depends on '
        "the load, so it is the steadier measure of a one-thread change.",
        "",
        f"CPU: {m['cpu']}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["flags"].items()),
        "",
        describe_targets(m.get("cpu_kind", "avx2")) + f". Training precision: {m.get('precision')}.",
        "",
        f"torch {m['torch']} (CPU capability {m['torch_cpu_capability']}); "
        "oneDNN kernels of a bf16 conv/matmul: " + "; ".join(f"`{k}`" for k in m["onednn_bf16_kernels"]),
        "",
    ]
    if r.get("parts"):
        lines += [
            "Measured in parts (`--merge`), each its own process run: "
            + "; ".join(f"`{p['args']}` ({p.get('wall_minutes')} min)" for p in r["parts"]),
            "",
        ]
    if r.get("targets"):
        lines += ["## Targets of this CPU", ""]
        lines += _table(
            ["target", "wanted", "measured", "met", "note"],
            [
                [
                    t["target"],
                    t["wanted"],
                    t["measured"],
                    {True: "met", False: "**not met**", None: "not measured"}[t["met"]],
                    t["note"],
                ]
                for t in r["targets"]
            ],
        )
    if "peaks" in r:
        lines += ["## Matmul peaks (2048 x 2048 `torch.mm`, GFLOP/s)", ""]
        lines += _table(
            ["dtype, threads", "best", "median", "best by CPU time"],
            [
                [
                    k.replace("_", ", ").replace("1t", "1 thread").replace("2t", "2 threads"),
                    v["best_gflops"],
                    v["median_gflops"],
                    v["best_gflops_cpu_time"],
                ]
                for k, v in r["peaks"].items()
                if isinstance(v, dict)
            ],
        )
        if r["peaks"].get("bf16_n", 2048) != 2048:
            n = r["peaks"]["bf16_n"]
            lines += [f"bf16 measured at {n} x {n}: this CPU has no bf16 units (a conversion path).", ""]
    if "profile" in r:
        lines += [
            "## Where a training step's time goes (`torch.profiler`, one thread; self CPU time by the "
            "operator kind of its outermost named caller)",
            "",
        ]
        for x in r["profile"]:
            head = (
                f"**{x['model']}, {x['image_size']}x{x['image_size']}, batch {x['batch']}, "
                f"{x['precision']}**: {x['step_ms']} ms per profiled step"
            )
            if "lightning_ms" in x:
                head += (
                    f"; through the LightningModule and a Trainer {x['lightning_ms']} ms vs the bare step "
                    f"{x['bare_ms']} ms ({x['lightning_overhead_pct']:+}%)"
                )
            lines += [head, ""]
            lines += _table(
                ["group", "ms per step", "%"], [[g["group"], g["ms"], g["pct"]] for g in x["groups"]]
            )
    if "training" in r:
        lines += [
            "## Training throughput (one optimizer step on a fixed batch; v objective, sigmoid schedule)",
            "",
        ]
        groups: dict = {}
        for row in r["training"]:
            groups.setdefault((row["model"], row["image_size"]), []).append(row)
        for (model, size), rows in groups.items():
            lines += [
                f"**{model}, {size}x{size}** ({rows[0]['gflop_per_image']} GFLOP per image, "
                "forward + backward; "
                f"reference: the first row)",
                "",
            ]
            lines += _table(
                [
                    "setup",
                    "images/s",
                    "x ref",
                    "per CPU-s",
                    "x ref (CPU)",
                    "GFLOP/s",
                    "% of matmul peak",
                    "% of peak (CPU time)",
                    "compile s",
                ],
                [
                    [
                        x["setup"],
                        x["images_per_s"],
                        x["vs_reference"],
                        x["images_per_cpu_s"],
                        x["vs_reference_cpu"],
                        x["achieved_gflops"],
                        x["pct_of_matmul_peak"],
                        x.get("pct_of_matmul_peak_cpu_time"),
                        x["compile_seconds"],
                    ]
                    for x in rows
                ],
            )
    if "numerics" in r:
        n = r["numerics"]
        lines += [
            f"## fp32 vs {n.get('fast_path', 'bf16-mixed')} training ({n['steps']} steps, digits 16x16, "
            f"batch {n['batch']})",
            "",
        ]
        lines += _table(
            [
                "run",
                f"mean loss per {n['window']} steps",
                "val bits/dim (fp32 eval)",
                "val bits/dim (bf16 eval)",
            ],
            [
                [
                    k,
                    " ".join(map(str, v["loss_windows"])),
                    "{:.3f} +- {:.3f}".format(*v["val_bpd_fp32_eval"]),
                    "{:.3f} +- {:.3f}".format(*v["val_bpd_bf16_eval"]) if "val_bpd_bf16_eval" in v else None,
                ]
                for k, v in n["runs"].items()
            ],
        )
        lines += [
            f"Largest gap between window means: {n.get('fast_path', 'bf16-mixed')} vs fp32 "
            f"{n.get('max_window_gap_fast_vs_fp32', n.get('max_window_gap_bf16_vs_fp32'))}, "
            f"fp32 seed 1 vs seed 0 {n['max_window_gap_seed1_vs_seed0']}.",
            "",
        ]
    if "threads" in r:
        lines += [
            "## Threads: the two-thread stall "
            f"(unet_tiny 32x32, batch 128, {m.get('precision', 'bf16-mixed')}; a fresh worker process per "
            "measurement)",
            "",
        ]
        lines += _table(
            ["situation", "case", "threads", "images/s", "x one thread", "load average before", "idle cores"],
            [
                [
                    x["situation"],
                    x["case"],
                    x.get("threads"),
                    x["images_per_s"],
                    x["vs_one_thread"],
                    x.get("load_average_before"),
                    x.get("idle_cores_before"),
                ]
                for x in r["threads"]
            ],
        )
    if "sampling" in r:
        lines += ["## Sampling throughput (unet_tiny 32x32, 32 images per run, 1 thread)", ""]
        lines += _table(
            ["sampler", "variant", "images/s", "x fp32", "per CPU-s", "x fp32 (CPU)", "GFLOP/s", "compile s"],
            [
                [
                    x["sampler"],
                    x["variant"],
                    x["images_per_s"],
                    x["vs_fp32"],
                    x["images_per_cpu_s"],
                    x.get("vs_fp32_cpu"),
                    x["achieved_gflops"],
                    x["compile_seconds"],
                ]
                for x in r["sampling"]
            ],
        )
    if "quality" in r and "rows" in r["quality"]:
        q = r["quality"]
        lines += [
            f"## Sample quality: {q['n']} samples, {q['sampler']}, "
            f"{q['image_size']}x{q['image_size']} checkpoint (step {q['global_step']})",
            "",
        ]
        lines += _table(
            ["variant", "seed", "FID (classifier features)", "class entropy", "seconds (incl. compile)"],
            [
                [x["variant"], x["seed"], x["fid_classifier"], x["class_entropy"], x["seconds_incl_compile"]]
                for x in q["rows"]
            ],
        )
    elif "quality" in r:
        lines += ["## Sample quality", "", f"Not measured: {r['quality']['skipped']}", ""]
    if "peer" in r and "rows" in r["peer"]:
        p = r["peer"]
        peer_args = ", ".join(f"{k}={v}" for k, v in p["peer_unet"].items())
        lines += [
            f"## Side by side with denoising-diffusion-pytorch ({p['image_size']}x{p['image_size']}, "
            f"training batch {p['batch']}, sampling batch {p.get('sampling_batch', p['batch'])}, "
            f"{p['threads']} thread)",
            "",
            f"Parameters: ours {p['parameters']['ours']:,}, peer {p['parameters']['peer']:,}; "
            f"training GFLOP per image: ours {p['gflop_per_image_train']['ours']}, "
            f"peer {p['gflop_per_image_train']['peer']} (peer U-Net: `Unet({peer_args})`).",
            "",
        ]
        lines += _table(
            ["work", "precision", "ours images/s", "peer images/s", "ours / peer"],
            [
                [
                    x["what"],
                    x["precision"],
                    x["ours_images_per_s"],
                    x["peer_images_per_s"],
                    x["ours_over_peer"],
                ]
                for x in p["rows"]
            ],
        )
    elif "peer" in r:
        lines += [
            "## Side by side with denoising-diffusion-pytorch",
            "",
            f"Not measured: {r['peer']['skipped']}",
            "",
        ]
    if "loader" in r:
        lines += ["## Loader vs training step", ""]
        lines += _table(
            ["dataset", "loader images/s", "bf16 training images/s", "ratio"],
            [
                [x["dataset"], x["loader_images_per_s"], x["train_images_per_s"], x["ratio"]]
                for x in r["loader"]
            ],
        )
    if "dit" in r:
        lines += [
            "## Diffusion Transformers (32x32, one channel, v objective, 1 thread; "
            "sampling: DPM-Solver++(2M), 20 network evaluations)",
            "",
            "GFLOP per image: forward + backward for training, 20 forwards for sampling, attention included. "
            '"% of peak": of the measured 1-thread matmul peak of the row\'s dtype; "% of bf16 peak": of the '
            "bf16 one.",
            "",
        ]
        lines += _table(
            [
                "model",
                "parameters",
                "work",
                "variant",
                "batch",
                "images/s",
                "per CPU-s",
                "GFLOP / image",
                "GFLOP/s",
                "% of peak",
                "% of bf16 peak",
                "compile s",
            ],
            [
                [
                    x["model"],
                    f"{x['parameters'] / 1e6:.2f}M",
                    x["work"],
                    x["variant"],
                    x["batch"],
                    x["images_per_s"],
                    x["images_per_cpu_s"],
                    x["gflop_per_image"],
                    x["achieved_gflops"],
                    x["pct_of_peak"],
                    x["pct_of_bf16_peak"],
                    x["compile_seconds"],
                ]
                for x in r["dit"]
            ],
        )
    return "\n".join(lines)
