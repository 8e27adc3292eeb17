"""Export a checkpoint as a folder that a model hub takes as it is (huggingface_hub's ModelHubMixin layout):

    python -m diffusion_lab.export ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt out=exports/digits

writes into ``out``

    model.safetensors  the weights (the EMA weights; ``ema=false``: the raw ones), tensors only, no pickle
    config.json        the resolved run config (less where and how it was launched: trainer, callbacks,
                       loggers, paths), ``image_shape``, ``num_classes``, ``format_version``, the step
    README.md          a model card: YAML front matter (``library_name``, ``tags``), then the data, the
                       family, the backbone, the sampler and the metrics the run measured

``diffusion_lab.load(out)`` reads it back offline without unpickling anything (:mod:`diffusion_lab.api`).
The metrics come from the run's folder where it is beside the checkpoint: its CSV logs (the last ``val/``
values up to the checkpoint's step) and the JSON of ``python -m diffusion_lab.evaluate`` on this
checkpoint; without either the card says "not measured".
"""

# ruff: noqa: E402  (a command sets up the process before its imports load torch)

from __future__ import annotations

if __name__ == "__main__":  # run as a command: OpenMP's settings before torch loads (utils/cpu.py)
    from diffusion_lab.utils.cpu import configure_command

    configure_command()

import csv
import json
import math
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.api import CARD_FILE, CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE
from diffusion_lab.utils.cli import exit_on_bad_input

__all__ = ["export", "export_config", "measured_metrics", "model_card", "main"]

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
EXPORTED = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)


# ------------------------------------------------------------------------------------------ config.json


def export_config(
    run_cfg: DictConfig | dict, image_shape, num_classes: int, global_step, weights: str
) -> dict:
    """The content of config.json: the format, the shapes, the run config without its launch-time parts."""
    from diffusion_lab.utils.safe_config import LAUNCH_TIME_KEYS

    plain = OmegaConf.to_container(run_cfg, resolve=True) if isinstance(run_cfg, DictConfig) else run_cfg
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "image_shape": [int(v) for v in image_shape],
        "num_classes": int(num_classes),
        "weights": weights,
        "global_step": global_step,
        "config": {k: v for k, v in plain.items() if k not in LAUNCH_TIME_KEYS},
    }


# ------------------------------------------------------------------------------------------ metrics

_EVAL_METRICS = ("fid_classifier", "kid_classifier", "is_classifier", "fid_inception", "kid_inception")
_EVAL_METRICS += ("is_inception", "bpd", "bpd_ode")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def measured_metrics(ckpt_path: str | Path, global_step: int | None) -> list[tuple[str, float, str]]:
    """(metric, value, where) for what the run measured of this checkpoint.

    - the run's CSV logs (``<run>/**/metrics.csv``): the last value of each ``val/`` and ``test/`` column at
      a step up to the checkpoint's;
    - ``python -m diffusion_lab.evaluate`` results beside the checkpoint (``<ckpt stem>.*.eval.json``).
    """
    path = Path(ckpt_path).resolve()
    run = path.parents[1] if path.parent.name == "checkpoints" else None
    found: list[tuple[str, float, str]] = []
    if run is not None:
        for log in sorted(run.rglob("metrics.csv")):
            last: dict[str, tuple[float, int]] = {}
            with open(log, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    step = _number(row.get("step", ""))
                    if step is None or (global_step is not None and step > global_step):
                        continue
                    for key, text in row.items():
                        value = _number(text)
                        if key and key.startswith(("val/", "test/")) and value is not None:
                            last[key] = (value, int(step))
            for key, (value, step) in sorted(last.items()):
                found.append((key, value, f"validation during training, step {step}"))
    for file in sorted(path.parent.glob(f"{path.stem}.*.eval.json")):
        try:
            results = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        drawn = f"evaluate: {results.get('sampler')}, {results.get('nfe')} NFE, n={results.get('n')}"
        for key in _EVAL_METRICS:
            value = results.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                images = results.get(f"{key}_images")
                how = (
                    drawn if "bpd" not in key else f"evaluate: {images} test images" if images else "evaluate"
                )
                found.append((key, float(value), how))
    return found


# ------------------------------------------------------------------------------------------ the card


def _family(cfg: dict) -> tuple[str, str]:
    """(one line naming the family and its settings, its hub tag)."""
    obj = cfg.get("objective") or {}
    target = str(obj.get("_target_", "?"))
    if target.endswith("EDMDiffusion"):
        return f"EDM (Karras et al. 2022), sigma_data={obj.get('sigma_data')}, continuous noise levels", "edm"
    if target.endswith("FlowMatching"):
        line = (
            f"flow matching / stochastic interpolant: {obj.get('path')} path, {obj.get('prediction')} "
            f"prediction, {obj.get('time_density')} training times"
        )
        return line, "flow-matching"
    sched = cfg.get("schedule") or {}
    line = (
        f"discrete Gaussian diffusion (DDPM family): {obj.get('parameterization')} prediction, "
        f"{sched.get('name')} schedule, T = {sched.get('timesteps')}"
    )
    return line, "ddpm"


def model_card(meta: dict, name: str, n_params: int | None, metrics: list[tuple[str, float, str]]) -> str:
    """README.md of an exported folder: YAML front matter for the hub, then what the model is."""
    from diffusion_lab.utils.checkpoint_sampler import describe_sampler, sampler_name

    cfg = meta["config"]
    data = cfg.get("dataset") or {}
    conditional = bool(cfg.get("class_conditional"))
    family, tag = _family(cfg)
    C, H, W = meta["image_shape"]
    front = {
        "library_name": "diffusion_lab",
        "tags": ["diffusion_lab", "diffusion", tag, f"dataset:{data.get('name', 'unknown')}"]
        + (["class-conditional"] if conditional else []),
    }
    if not conditional:
        front["pipeline_tag"] = "unconditional-image-generation"
    sampler = cfg.get("sampler")
    sampler_line = (
        f"`{sampler_name(sampler)}`: {describe_sampler(sampler)}"
        if sampler
        else "none stored (the commands draw with ddpm)"
    )
    model = cfg.get("model") or {}
    backbone = str(model.get("_target_", "?")).rsplit(".", 1)[-1]
    if n_params is not None:
        backbone += f", {n_params:,} parameters"
    classes = f"{meta['num_classes']} classes, " + ("class-conditional" if conditional else "unconditional")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        "A diffusion model trained with diffusion_lab and exported with `python -m diffusion_lab.export`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| data | {data.get('name', 'unknown')}: {C} x {H} x {W} images, {classes} |",
        f"| family | {family} |",
        f"| backbone | {backbone} |",
        f"| sampler (the run's) | {sampler_line} |",
        f"| training steps | {meta.get('global_step')} |",
        f"| weights | {'EMA' if meta.get('weights') == 'ema' else 'raw (no EMA)'} |",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value | measured |", "| --- | --- | --- |"]
        lines += [f"| {key} | {value:.4g} | {where} |" for key, value, where in metrics]
    else:
        lines.append(
            "not measured (no validation logs or evaluation results were found beside the checkpoint)"
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import diffusion_lab",
        "",
        f'pipe = diffusion_lab.load("{name}")  # this folder: config.json + model.safetensors, no pickle',
        "images = pipe.sample(16, seed=0).to_pil()",
        "```",
        "",
        "or `python -m diffusion_lab.sample ckpt=<this folder> n=64`.",
        "",
        "## Files",
        "",
        f"- `{WEIGHTS_FILE}`: the weights (safetensors)",
        f"- `{CONFIG_FILE}`: the run config, the image shape, the classes, the format version",
        f"- `{CARD_FILE}`: this card",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ export


def export(
    ckpt: str | Path, out: str | Path, ema: bool = True, overwrite: bool = False, name: str | None = None
) -> Path:
    """Write ``out``/{model.safetensors, config.json, README.md} from checkpoint ``ckpt``; returns ``out``.

    The module is rebuilt from the checkpoint first (its config checked as every load checks it), so what is
    written is exactly what :func:`diffusion_lab.load` builds and loads strictly. Each file is written
    atomically. An ``out`` that already holds an export is refused unless ``overwrite``.
    """
    from safetensors.torch import save as to_safetensors

    from diffusion_lab.models import count_parameters
    from diffusion_lab.training.checkpoint import load_module
    from diffusion_lab.utils.fileio import atomic_write

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file: give a folder")
    present = [f for f in EXPORTED if (out / f).exists()]
    if present and not overwrite:
        raise ValueError(f"out={out} already holds an export ({', '.join(present)}): add overwrite=true")
    module, run_cfg, state = load_module(ckpt, map_location="cpu", ema=ema)
    weights = "ema" if ema and "current_model_state" in state else "raw"
    meta = export_config(
        run_cfg, module.image_shape, module.hparams.num_classes, state.get("global_step"), weights
    )
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    payload = to_safetensors(
        tensors, metadata={"format": "pt", "diffusion_lab_format_version": str(FORMAT_VERSION)}
    )
    card = model_card(
        meta,
        name or out.resolve().name,
        count_parameters(module.model),
        measured_metrics(ckpt, meta["global_step"]),
    )
    atomic_write(out / WEIGHTS_FILE, lambda f: f.write(payload))
    atomic_write(out / CONFIG_FILE, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    atomic_write(out / CARD_FILE, lambda f: f.write(card.encode()))
    return out


def _default_out(ckpt: str) -> Path:
    """``<run>/export`` for ``<run>/checkpoints/last.ckpt``; ``export-<name>`` for another checkpoint."""
    path = Path(ckpt).resolve()
    run = path.parents[1] if path.parent.name == "checkpoints" else path.parent
    return run / ("export" if path.stem == "last" else f"export-{path.stem}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def _export_main(cfg: DictConfig) -> None:
    from diffusion_lab.sample import require_checkpoint

    with exit_on_bad_input():
        ckpt = require_checkpoint(cfg)
        if Path(ckpt).is_dir():
            raise ValueError(f"ckpt={ckpt} is a folder: give a checkpoint file (.ckpt)")
        out = Path(cfg.out) if cfg.out else _default_out(ckpt)
        export(ckpt, out, ema=bool(cfg.ema), overwrite=bool(cfg.overwrite), name=cfg.get("name"))
    print(f"exported {ckpt} -> {out} ({', '.join(EXPORTED)})")


def main() -> None:
    _export_main()


if __name__ == "__main__":
    main()
