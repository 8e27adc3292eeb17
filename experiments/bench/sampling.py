"""Sampling throughput of the presets' samplers (DPM-Solver++(2M) 20 steps; Heun 18 steps with churn
S_churn=2, EDM Algorithm 2, as in conf/experiment/hoda32_uncond.yaml) in fp32 and compiled, and in bf16
autocast where the CPU has bf16 units; and the classifier-feature FID of 1,000 samples of a trained
checkpoint drawn each way."""

from __future__ import annotations

import copy
import time
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from diffusion_lab.samplers import get_sampler, sample
from experiments.bench.setups import autocast, build_backbone, flops_per_image, make_diffusion
from experiments.bench.timing import interleave

__all__ = ["run_sampling_speed", "run_sampling_quality", "SAMPLERS"]

# key -> (sampler, steps, sampler keywords); Heun's 18 steps are 35 network evaluations
SAMPLERS = {
    "dpm_solver_20": ("dpm_solver", 20, {}),
    "heun_18_churn2": ("heun", 18, {"S_churn": 2.0}),
}
NFE = {"dpm_solver_20": 20, "heun_18_churn2": 35}
VARIANTS = {
    "fp32": (False, False),
    "fp32_compile": (False, True),
    "bf16": (True, False),
    "bf16_compile": (True, True),
}


def _variants(
    model: torch.nn.Module, compile_: bool, bf16_units: bool = True, names: tuple[str, ...] | None = None
) -> dict:
    """{variant: (model, bf16)}; compiled ones are compiled copies, warmed up by the caller. Without bf16
    units only the fp32 variants (bf16 runs many times slower there)."""
    out = {}
    for name, (bf16, comp) in VARIANTS.items():
        if (comp and not compile_) or (bf16 and not bf16_units) or (names and name not in names):
            continue
        m = copy.deepcopy(model).eval() if comp else model
        if comp:
            m.compile()
        out[name] = (m, bf16)
    return out


def run_sampling_speed(
    size: int = 32,
    n: int = 32,
    seconds: float = 3.0,
    repeats: int = 2,
    compile_: bool = True,
    log=print,
    model_name: str = "unet_tiny",
    samplers: dict[str, tuple] = SAMPLERS,
    bf16_units: bool = True,
    variants: tuple[str, ...] | None = None,
) -> list[dict]:
    """Images/s of ``samplers`` ({key: (sampler, steps[, keywords])}) with ``conf/model/<model_name>``, n
    images a run."""
    torch.manual_seed(0)
    model = build_backbone(model_name, size).eval()
    diffusion = make_diffusion()
    fwd = flops_per_image(model, (1, size, size), backward=False)
    variants = _variants(model, compile_, bf16_units, variants)
    cases, nfe, compile_s = {}, {}, {}
    for vname, (m, bf16) in variants.items():
        for sname, (sampler, steps, *kw) in samplers.items():
            kw = kw[0] if kw else {}

            def run(m=m, bf16=bf16, sampler=sampler, steps=steps, kw=kw) -> int:
                with torch.no_grad(), autocast(bf16):
                    sample(m, diffusion, (n, 1, size, size), sampler=sampler, steps=steps, seed=0, **kw)
                return n

            start = time.perf_counter()
            run()  # warm-up (compiles the compiled variant)
            if vname.endswith("compile") and vname not in compile_s:  # the first sampler's run
                compile_s[vname] = round(time.perf_counter() - start, 1)
                log(f"  sampling {vname}: first run (compile) {compile_s[vname]} s")
            cases[f"{vname}|{sname}"] = run
            nfe[sname] = NFE.get(sname, steps)
    timed = interleave(cases, seconds, repeats, 1)
    rows = []
    for key, t in timed.items():
        vname, sname = key.split("|")
        ref = timed[f"fp32|{sname}"]["ips"]
        row = {
            "sampler": sname,
            "variant": vname,
            "images_per_s": round(t["ips"], 2),
            "images_per_cpu_s": round(t["ips_cpu"], 2),
            "vs_fp32": round(t["ips"] / ref, 2),
            "vs_fp32_cpu": round(t["ips_cpu"] / timed[f"fp32|{sname}"]["ips_cpu"], 2),
            "achieved_gflops": round(t["ips"] * nfe[sname] * fwd / 1e9, 1),
            "compile_seconds": compile_s.get(vname),
        }
        rows.append(row)
        log(f"  {sname:<14} {vname:<13} {row['images_per_s']:7.1f} img/s ({row['vs_fp32']:.2f}x fp32)")
    return rows


def run_sampling_quality(
    ckpt: str, classifier: str, data_root: str | None, n: int = 1000, compile_: bool = True, log=print
) -> dict:
    """FID on the classifier's features of ``n`` DPM-Solver++ 20-step samples per variant, same seeds; an
    fp32 row with other seeds gives the seed-to-seed spread."""
    from diffusion_lab.metrics import MetricSuite
    from diffusion_lab.sample import generate
    from diffusion_lab.training.checkpoint import load_module

    module, cfg, ckpt_dict = load_module(ckpt)
    with open_dict(cfg):
        if data_root:
            cfg.dataset.root = data_root
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    suite = MetricSuite(
        ["fid_classifier", "class_histogram"], classifier=classifier, cache_dir=cfg.metrics.cache_dir
    )
    real = dm.real_images("test")[0]
    key = f"{dm.name}-test-{dm.image_size}px-{dm.channels}ch-nall"
    suite.compute(real[:100], real=real, cache_key=key)  # real statistics once, outside the timings
    sampler = partial(get_sampler("dpm_solver"), steps=20)
    rows = []
    plan = [("fp32", 0), ("bf16", 0), ("bf16_compile", 0), ("fp32", 1000)]
    compiled = None
    for variant, seed in plan:
        if variant.endswith("compile") and not compile_:
            continue
        m = module
        if variant.endswith("compile"):
            compiled = compiled or copy.deepcopy(module)
            compiled.model.compile()
            m = compiled
        start = time.perf_counter()
        with autocast(variant.startswith("bf16")):
            fake, _, _ = generate(m, sampler, n, seed=seed, batch_size=500)
        seconds = time.perf_counter() - start
        scores = suite.compute(fake, cache_key=key)
        row = {
            "variant": variant,
            "seed": seed,
            "fid_classifier": round(float(scores["fid_classifier"]), 3),
            "class_entropy": round(float(scores["class_entropy"]), 4),
            "seconds_incl_compile": round(seconds, 1),
        }
        rows.append(row)
        log(f"  {variant:<13} seed {seed:<5} FID(classifier) {row['fid_classifier']:.3f}  {seconds:.1f} s")
    return {
        "checkpoint": str(Path(ckpt).resolve()),
        "global_step": ckpt_dict.get("global_step"),
        "image_size": dm.image_size,
        "n": n,
        "sampler": "DPM-Solver++(2M), 20 steps",
        "rows": rows,
    }
