"""Evaluate a checkpoint, or train the digit classifier behind the classifier-feature metrics.

    python -m diffusion_lab.evaluate ckpt=PATH metrics=[fid_classifier,kid,bpd] n=10000
    python -m diffusion_lab.evaluate ckpt=PATH metrics=[bpd_ode] bpd_n=256   # any family with a path
    python -m diffusion_lab.metrics.train_classifier dataset=persian dataset.root=/path/to/hoda

The first samples with the checkpoint's own sampler config (``sampler=NAME`` chooses another,
``sampler.steps=50`` changes one key of it: :mod:`diffusion_lab.utils.checkpoint_sampler`), compares with the
checkpoint's dataset (read where it was trained unless ``data_root=`` says where it lives now), prints a
table and writes JSON beside the checkpoint; the second trains the CNN whose features and logits give
``fid_classifier``, ``kid_classifier``, ``is_classifier`` and the class histogram.
"""

# ruff: noqa: E402  (a command sets up the process before its imports load torch)

from __future__ import annotations

if __name__ == "__main__":  # run as a command: OpenMP's settings before torch loads (utils/cpu.py)
    from diffusion_lab.utils.cpu import configure_command

    configure_command()

import json
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.config_schema import MetricsConfig, SamplerConfig, instantiate_checked
from diffusion_lab.metrics import DISPLAY_NAMES, MetricSuite
from diffusion_lab.metrics.bpd_ode import ode_bpd_over_images
from diffusion_lab.sample import (
    check_count,
    check_sampler,
    generate,
    load_guide,
    require_checkpoint,
    resolve_device,
    use_checkpoint_sampler,
)
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.utils.checkpoint_sampler import sampler_name
from diffusion_lab.utils.cli import HELP_FLAGS, exit_on_bad_input
from diffusion_lab.utils.media import to_unit_range
from diffusion_lab.utils.progress import track

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ALIASES = {"kid": "kid_classifier", "is": "is_classifier", "fid": None}
_BPD_LABELS = {
    "bpd": "bits/dim (exact bound)",
    "bpd_ode": "bits/dim (probability-flow ODE, dequantized: upper bound)",
}

__all__ = ["evaluate", "exact_bpd", "check_data_root", "write_results", "main"]


def _metric_names(requested) -> tuple[list[str], bool]:
    names, bpd = [], False
    for name in requested:
        name = str(name)
        if name == "bpd_ode":  # read by evaluate() itself
            continue
        if name == "bpd":
            bpd = True
            continue
        if name in ALIASES:
            if ALIASES[name] is None:
                raise ValueError("metric 'fid' is ambiguous: say fid_classifier or fid_inception")
            name = ALIASES[name]
        if name not in DISPLAY_NAMES:
            raise ValueError(f"unknown metric '{name}'; choose from {sorted(DISPLAY_NAMES)}, bpd or bpd_ode")
        names.append(name)
    return names, bpd


@torch.no_grad()
def exact_bpd(module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device, seed: int = 0):
    """Mean and standard error of the full bound (all T terms + prior) in bits/dim over uint8 ``images``."""
    g = torch.Generator(device=device).manual_seed(seed)
    per_image = []
    conditional = bool(module.hparams.class_conditional)
    for i in track(range(0, len(images), batch_size), "bits/dim (exact bound)"):
        x0 = to_unit_range(images[i : i + batch_size].to(device))
        y = labels[i : i + batch_size].to(device) if conditional else None
        per_image.append(module.diffusion.bpd_bound(module.model, x0, y=y, generator=g)["total_bpd"].cpu())
    values = torch.cat(per_image).double()
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return values.mean().item(), se


def check_data_root(dataset: DictConfig, data_root: str | None) -> None:
    """Refuse, before anything is sampled, a dataset folder that is not on this machine.

    A checkpoint stores the ``dataset.root`` of the machine that trained it. Where that path does not exist
    here, reading (or downloading into) it, or falling back to another copy, would compare against data
    other than the user's; the one-line error names the stored path and the ``data_root=`` fix, and the
    shared-data copy (``$DIFFUSION_LAB_SHARED_DATA/<folder>``) where one exists.
    """
    name = dataset.get("name")
    if data_root:
        if not Path(data_root).expanduser().exists():
            raise FileNotFoundError(
                f"data_root={data_root} does not exist: give the folder with the {name!r} dataset's files"
            )
        return
    root = dataset.get("root")
    if root is None or Path(str(root)).expanduser().exists():  # None: a bundled dataset (digits)
        return
    hint = ""
    shared = os.environ.get("DIFFUSION_LAB_SHARED_DATA")
    if shared:
        for folder in dict.fromkeys((Path(str(root)).name, str(name))):
            candidate = Path(shared) / folder
            if candidate.is_dir() and any(candidate.iterdir()):
                hint = f" (the shared data holds it: data_root={candidate})"
                break
    raise FileNotFoundError(
        f"the checkpoint's dataset {name!r} lived at {root} (its stored dataset.root), which does not exist "
        f"here: give where it lives now with data_root=PATH{hint}"
    )


def evaluate(cfg: DictConfig) -> dict:
    ckpt_path = require_checkpoint(cfg)
    requested = cfg.metrics if cfg.get("metric_names") is None else cfg.metric_names  # the former name
    names, want_bpd = _metric_names(requested)
    want_ode = "bpd_ode" in [str(n) for n in requested]
    if names:
        check_count(cfg, "n")
        check_count(cfg, "batch_size")
    if want_bpd or want_ode:
        check_count(cfg, "bpd_n")
        check_count(cfg, "bpd_batch_size")
    device = resolve_device(cfg.device)
    module, run_cfg, ckpt = load_module(ckpt_path, ema=cfg.ema)
    check_data_root(run_cfg.dataset, cfg.data_root)
    guide, choice = None, None
    if names:
        choice = use_checkpoint_sampler(cfg, run_cfg, ckpt_path)
        check_sampler(cfg, module)
        guide = load_guide(cfg, module, run_cfg)
    with open_dict(run_cfg):
        if cfg.data_root:
            run_cfg.dataset.root = cfg.data_root
    dm = instantiate_checked(run_cfg.dataset, "dataset")
    dm.prepare_data()
    results: dict = {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "global_step": ckpt.get("global_step"),
        "dataset": dm.name,
        "ema": bool(cfg.ema),
    }
    if names:
        sampler = instantiate_checked(cfg.sampler, "sampler")
        sname = sampler_name(cfg.sampler)
        start = time.perf_counter()
        weight = float(cfg.guide_weight) if guide is not None else 1.0
        fake, _, nfe = generate(
            module, sampler, cfg.n, cfg.seed, cfg.batch_size, device, guide=guide, guide_weight=weight
        )
        results.update(
            sampler=sname,
            sampler_source=choice.source,
            sampler_config=OmegaConf.to_container(choice.config, resolve=True),
            sampler_steps=cfg.sampler.get("steps"),
            guidance_scale=float(cfg.sampler.get("guidance_scale", SamplerConfig.guidance_scale)),
            guidance=cfg.guidance if guide is not None else None,
            guide_ckpt=str(cfg.guide_ckpt) if guide is not None else None,
            guide_weight=weight,
            nfe=nfe,
            n=int(cfg.n),
            sampling_seconds=round(time.perf_counter() - start, 2),
        )
        metric_cfg = run_cfg.get("metrics") or {}
        classifier = cfg.classifier_path or metric_cfg.get("classifier_path", MetricsConfig.classifier_path)
        suite = MetricSuite(
            names,
            classifier=classifier,
            inception_weights=cfg.inception_weights,
            cache_dir=metric_cfg.get("cache_dir", MetricsConfig.cache_dir),
            device=device,
        )
        key = dm.real_stats_key(cfg.real_split, cfg.n_real)
        start = time.perf_counter()
        scores = suite.compute(
            fake, real=lambda: dm.real_images(cfg.real_split, cfg.n_real)[0], cache_key=key
        )
        hist = scores.pop("class_histogram", None)
        results.update({k: float(v) for k, v in scores.items()})
        if hist is not None:
            results["class_histogram"] = hist.tolist()
        results["metric_seconds"] = round(time.perf_counter() - start, 2)
    if want_bpd:
        images, labels = dm.real_images(cfg.real_split, cfg.bpd_n)
        start = time.perf_counter()
        mean, se = exact_bpd(module.to(device), images, labels, cfg.bpd_batch_size, device, cfg.seed)
        results.update(
            bpd=mean, bpd_stderr=se, bpd_images=len(images), bpd_seconds=round(time.perf_counter() - start, 2)
        )
    if want_ode:
        images, labels = dm.real_images(cfg.real_split, cfg.bpd_n)
        module.to(device)
        labels = labels if module.hparams.class_conditional else None
        options = OmegaConf.to_container(cfg.bpd_ode, resolve=True) if cfg.bpd_ode else {}
        results.update(
            ode_bpd_over_images(
                module.diffusion, module.model, images, labels, cfg.bpd_batch_size, device, cfg.seed, options
            )
        )
    return results


def _print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['dataset']} @ step {results['global_step']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        if k in ("checkpoint", "dataset", "global_step", "sampler_config"):
            continue
        label = DISPLAY_NAMES.get(k, _BPD_LABELS.get(k, k))
        table.add_row(label, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def _evaluate_main(cfg: DictConfig) -> None:
    with exit_on_bad_input():
        results = evaluate(cfg)
    _print_table(results)
    steps = results.get("sampler_steps")
    out = (
        Path(cfg.out)
        if cfg.out
        else Path(cfg.ckpt).with_suffix(f".{results.get('sampler', 'bpd')}{steps or ''}-n{cfg.n}.eval.json")
    )
    write_results(results, cfg, out)
    print(f"written: {out}")


def write_results(results: dict, cfg: DictConfig, out: Path) -> None:
    """The results and the command's config as JSON at ``out``, the checkpoint named relative to ``out``'s
    folder: the file stays valid when the run folder moves, and names no user's home directory."""
    config = OmegaConf.to_container(cfg, resolve=True)
    here = Path(out).resolve().parent

    def relative(path) -> str:
        return os.path.relpath(Path(str(path)).resolve(), here)

    if results.get("checkpoint"):
        results = {**results, "checkpoint": relative(results["checkpoint"])}
    if config.get("ckpt"):
        config["ckpt"] = relative(config["ckpt"])
    Path(out).write_text(json.dumps({**results, "config": config}, indent=2))


def _train_classifier(overrides: list[str]) -> None:
    """``python -m diffusion_lab.evaluate train_classifier ...``: the same as
    ``python -m diffusion_lab.metrics.train_classifier ...`` (conf/train_classifier.yaml, composed here)."""
    from diffusion_lab.api import compose_config
    from diffusion_lab.metrics.train_classifier import run

    if any(a in HELP_FLAGS for a in overrides):
        print("usage: python -m diffusion_lab.evaluate train_classifier dataset=<name> [...]: the same as")
        print("python -m diffusion_lab.metrics.train_classifier dataset=<name> [...] (see its --help)")
        return
    with exit_on_bad_input():
        run(compose_config("train_classifier", overrides))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "train_classifier":
        _train_classifier(sys.argv[2:])
        return
    _evaluate_main()


if __name__ == "__main__":
    main()
