"""Reconstruct the EMA of any length from a run's post-hoc EMA snapshots (Karras et al. 2024, EDM2 App. C.2):

    python -m diffusion_lab.phema run_dir=outputs/train/runs/<run> sigma_rel=0.08 [step=N] [out=PATH]

A Hydra command (options in ``conf/phema.yaml``; ``--help`` lists them). The run must have trained with
``callbacks=phema``. The result is the run's checkpoint (``ckpt=``, default
``<run_dir>/checkpoints/last.ckpt``) with the reconstructed weights as its EMA weights
(``state_dict``; the raw weights stay in ``current_model_state``), without the optimizer and callback
state: ``sample`` and ``evaluate`` read it like any ``last.ckpt`` (with ``ema=true``); it does not resume
training.
Default ``out``: ``<run_dir>/checkpoints/phema-<sigma_rel>-step<step>.ckpt``.
"""

# ruff: noqa: E402  (a command sets up the process before its imports load torch)

from __future__ import annotations

if __name__ == "__main__":  # run as a command: OpenMP's settings before torch loads (utils/cpu.py)
    from diffusion_lab.utils.cpu import configure_command

    configure_command()

from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffusion_lab.training.checkpoint import read_checkpoint
from diffusion_lab.training.checkpoint_io import atomic_torch_save
from diffusion_lab.training.phema import list_snapshots, reconstruct_state
from diffusion_lab.utils.cli import exit_on_bad_input

__all__ = ["reconstruct_checkpoint", "run", "main"]

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
DROPPED = ("optimizer_states", "lr_schedulers", "callbacks", "loops")  # training state only


def reconstruct_checkpoint(
    run_dir: str | Path,
    sigma_rel: float,
    step: int | None = None,
    out: str | Path | None = None,
    ckpt: str | Path | None = None,
    dirname: str = "phema",
) -> Path:
    """Write the checkpoint with the post-hoc EMA of ``sigma_rel`` at ``step`` (default: the last
    snapshot); return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir} is not a directory: give a training run's folder")
    snapshots = list_snapshots(run_dir / dirname)
    if not snapshots:
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots in {run_dir / dirname}: train with callbacks=phema to record them"
        )
    state, info = reconstruct_state(snapshots, sigma_rel, step)
    base_path = Path(ckpt) if ckpt else run_dir / "checkpoints" / "last.ckpt"
    base = read_checkpoint(base_path)
    ema_state = dict(base["state_dict"])
    missing = sorted(set(state) - set(ema_state))
    if missing:
        raise ValueError(
            f"the snapshots hold weights {missing[:3]} that checkpoint {base_path} lacks: "
            "give the same run's checkpoint with ckpt=PATH"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(ema_state[k].shape):
            raise ValueError(
                f"snapshot weight {k} {tuple(v.shape)} vs checkpoint {tuple(ema_state[k].shape)}"
            )
        ema_state[k] = v.to(ema_state[k].dtype)
    result = {k: v for k, v in base.items() if k not in DROPPED}
    result.setdefault("current_model_state", base["state_dict"])  # the raw weights (ema=false)
    result["state_dict"] = ema_state
    result["global_step"] = info["step"]
    result["phema"] = {
        "sigma_rel": info["sigma_rel"],
        "gamma": info["gamma"],
        "step": info["step"],
        "snapshots": [Path(p).name for p in info["snapshots"]],
        "coefficients": info["coefficients"],
        "base_checkpoint": str(base_path),
    }
    out = (
        Path(out)
        if out
        else run_dir / "checkpoints" / f"phema-{float(sigma_rel):.3f}-step{info['step']:07d}.ckpt"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(result, out)
    return out


def run(cfg: DictConfig) -> Path:
    """The command on a composed ``conf/phema.yaml`` (``diffusion_lab.api.compose_config("phema", [...])``
    in Python): check the values, write the checkpoint, print where it went."""
    sigma_rel, step = cfg.sigma_rel, cfg.step
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise ValueError(f"sigma_rel={sigma_rel!r} is not a number: give e.g. sigma_rel=0.08")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise ValueError(f"step={step!r} is not an integer: give a training step, or leave it out")
    out = reconstruct_checkpoint(
        cfg.run_dir, float(sigma_rel), step, out=cfg.out, ckpt=cfg.ckpt, dirname=cfg.dirname
    )
    print(f"post-hoc EMA sigma_rel={sigma_rel} -> {out}")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="phema")
def _phema_main(cfg: DictConfig) -> None:
    with exit_on_bad_input():
        run(cfg)


def main() -> None:
    _phema_main()


if __name__ == "__main__":
    main()
