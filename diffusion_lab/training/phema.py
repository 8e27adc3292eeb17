"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, Sec. 3 and App. C): track power-function EMA profiles of the weights during training, save snapshots
of them, and after training reconstruct the EMA of any length by least squares over the snapshots.

Notation (EDM2 Sec. 3):

    t          training step, 1, 2, ... (the first update copies the weights)
    gamma      exponent of the power-function profile: the EMA at step t weighs theta_tau by
               p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 <= tau <= t        (EDM2 Eq. 2)
    sigma_rel  the profile's standard deviation relative to its length t; a function of gamma alone
               sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))             (EDM2 Eq. 3)
    beta_t     decay of step t: theta_hat_t = beta_t theta_hat_(t-1) + (1 - beta_t) theta_t,
               beta_t = (1 - 1/t)^(gamma + 1)                                          (EDM2 Eq. 4)

The pure math comes first (numpy float64, no Lightning), then the :class:`PostHocEMA` callback and the
reconstruction from a run's snapshots (:func:`reconstruct_state`).

Why not lucidrains' ``ema-pytorch`` ``PostHocEMA``: its snapshots are plain ``torch.save`` calls (not
atomic: a kill mid-write leaves a truncated file the synthesis then reads), its profiles are not part of a
Lightning checkpoint (a resumed run restarts them), it has no bound on the disk used, and it synthesises
into an ``nn.Module`` rather than a checkpoint the commands read. What it would save us is the ~40 lines of
closed-form math below, which follow NVlabs/edm2 ``training/phema.py`` and are tested against it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from diffusion_lab.training.checkpoint_io import atomic_torch_save

log = logging.getLogger(__name__)

__all__ = [
    "SIGMA_REL_MAX",
    "gamma_to_sigma_rel",
    "sigma_rel_to_gamma",
    "power_ema_beta",
    "profile_inner_product",
    "solve_weights",
    "PostHocEMA",
    "list_snapshots",
    "reconstruct_state",
]

SIGMA_REL_MAX = float(np.sqrt(1.0 / 12.0))  # sigma_rel at gamma = 0 (a uniform average): ~0.2887

# ----------------------------------------------------------------------------------- the math


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))  (EDM2 Eq. 3)."""
    g = np.asarray(gamma, dtype=np.float64)
    out = np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    return float(out) if out.ndim == 0 else out


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> float | np.ndarray:
    """The exponent gamma > 0 of the profile with relative standard deviation ``sigma_rel`` (EDM2 App. C.1).

    Squaring Eq. 3 and clearing denominators gives a cubic in gamma with s = sigma_rel^-2,

        gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0,

    whose largest real root is the answer (positive for 0 < sigma_rel < sqrt(1/12)).
    """
    s = np.asarray(sigma_rel, dtype=np.float64)
    if np.any(~np.isfinite(s)) or np.any(s <= 0) or np.any(s >= SIGMA_REL_MAX):
        raise ValueError(
            f"sigma_rel={sigma_rel} is not valid: give values in (0, {SIGMA_REL_MAX:.4f}), e.g. 0.05 or 0.10"
        )
    inv = s.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]) for v in inv]
    gamma = np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots]).reshape(s.shape)
    return float(gamma) if gamma.ndim == 0 else gamma


def power_ema_beta(gamma: float, step: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1)  (EDM2 Eq. 4); step t = 1 gives 0 (the EMA starts as a copy)."""
    if step < 1:
        raise ValueError(f"the power-function EMA counts steps from 1, got step={step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_(t_a, gamma_a)(tau) p_(t_b, gamma_b)(tau) d tau  (EDM2 App. C.2).

    With p_(t, gamma)(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] and t_a <= t_b:

        <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b)^gamma_b / t_b

    and symmetrically (exponent -gamma_a, divided by t_a) when t_a > t_b. Broadcasts over its arguments.
    """
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, g_b, -g_a)
    t_max = np.maximum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * ratio**exponent / t_max


def solve_weights(
    in_steps: Sequence[float], in_sigma_rel: Sequence[float], out_step: float, out_sigma_rel: float
) -> np.ndarray:
    """Coefficients x (N,), sum_i x_i = 1, with sum_i x_i p_i closest to the target profile in L2
    (EDM2 App. C.2, Algorithm 3; NVlabs/edm2 ``solve_posthoc_coefficients``).

    1. The normal equations A x = b, A_ij = <p_i, p_j> between the snapshot profiles, b_i = <p_i, p_out>,
       solved by least squares (``np.linalg.lstsq``; A is ill-conditioned for many snapshots, as in EDM2).
    2. x <- x / sum_i x_i  (EDM2 Algorithm 3, ``X = X / np.sum(X, axis=0)``). Every p_i integrates to one,
       so the projection of step 1 carries mass sum_i x_i, which falls short of one when the snapshots are
       few or the target lies outside the tracked sigma_rels (4 snapshots of 0.05 and 0.10, target 0.01:
       0.725). Rescaling makes the result a weighted average of the snapshots: a constant weight stays
       that constant instead of shrinking towards zero.

    Args:
        in_steps, in_sigma_rel: (N,) step and sigma_rel of each snapshot profile.
        out_step, out_sigma_rel: the profile to reconstruct (its step no later than the last snapshot's).

    Returns:
        (N,) float64 coefficients summing to one.
    """
    t = np.asarray(in_steps, dtype=np.float64).reshape(-1, 1)
    g = sigma_rel_to_gamma(np.asarray(in_sigma_rel, dtype=np.float64)).reshape(-1, 1)
    g_out = sigma_rel_to_gamma(float(out_sigma_rel))
    A = profile_inner_product(t, g, t.T, g.T)  # (N, N)
    b = profile_inner_product(t, g, float(out_step), g_out)  # (N, 1)
    x = np.linalg.lstsq(A, b, rcond=None)[0].reshape(-1)  # step 1
    return x / x.sum()  # step 2: a weighted average of the snapshots


@torch.no_grad()
def power_ema_update_(ema: Sequence[Tensor], params: Sequence[Tensor], beta: float) -> None:
    """In place: ema <- beta ema + (1 - beta) theta for every floating tensor (one fused lerp)."""
    torch._foreach_lerp_(list(ema), list(params), 1.0 - beta)


# ------------------------------------------------------------------------------ the callback

_SNAPSHOT = re.compile(r"phema-step(\d+)\.pt$")


def snapshot_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"phema-step{step:08d}.pt"


class PostHocEMA(pl.Callback):
    """Power-function EMA profiles of the weights, with snapshots for post-hoc reconstruction (EDM2 Sec. 3).

    After every optimizer step t (the trainer's ``global_step``), each profile k is updated with
    beta_t = (1 - 1/t)^(gamma_k + 1) (EDM2 Eq. 4) over the module's floating-point parameters. Every
    ``every_n_steps`` steps, and when training ends, rank zero writes one snapshot holding every profile,
    ``<run>/phema/phema-stepNNNNNNNN.pt``, atomically (temp file, fsync, replace).

    Disk bound: when more than ``max_snapshots`` periodic snapshots exist, every other one is removed (those
    at odd multiples of the period) and the period doubles, so the run holds at most ``max_snapshots`` + 1
    files of ``len(sigma_rels)`` x (parameter bytes) each, spread over the whole run; the size is logged at
    the first snapshot. The profiles are part of the Lightning checkpoint (``state_dict``), so a resumed run
    continues them exactly; snapshots newer than the resumed step (written after the last checkpoint by the
    run that stopped) are removed at the start.

    Args:
        sigma_rels: relative standard deviations of the tracked profiles (EDM2: 0.05 and 0.10).
        every_n_steps: snapshot period in optimizer steps (it doubles when ``max_snapshots`` is reached).
        max_snapshots: bound on the periodic snapshots kept.
        dirname: folder of the snapshots inside the run directory.
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 500,
        max_snapshots: int = 64,
        dirname: str = "phema",
    ):
        sigma_rels = [float(s) for s in sigma_rels]
        if not sigma_rels:
            raise ValueError("phema: sigma_rels is empty; give at least one, e.g. [0.05, 0.10]")
        self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"phema: every_n_steps={every_n_steps!r} is not valid: give a whole number >= 1")
        if not isinstance(max_snapshots, int) or max_snapshots < 2:
            raise ValueError(f"phema: max_snapshots={max_snapshots!r} is not valid: give a whole number >= 2")
        self.sigma_rels = sigma_rels
        self.every_n_steps = every_n_steps
        self.max_snapshots = max_snapshots
        self.dirname = dirname
        self.profiles: list[dict[str, Tensor]] | None = None
        self._loaded: dict[str, Any] | None = None
        self._last_snapshot = -1
        self._last_update = -1

    # ------------------------------------------------------------------ state
    @staticmethod
    def _params(pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {k: p for k, p in pl_module.named_parameters() if p.is_floating_point()}

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.dirname

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
                raise ValueError(
                    f"phema: the checkpoint tracks sigma_rels {state['sigma_rels']} but the config asks for "
                    f"{self.sigma_rels}; resume with the checkpoint's callbacks.phema.sigma_rels"
                )
            self.every_n_steps = int(state["every_n_steps"])
            self.profiles = [
                {
                    k: v.detach().to(device=params[k].device, dtype=params[k].dtype).clone()
                    for k, v in p.items()
                }
                for p in state["profiles"]
            ]
        else:
            self.profiles = [{k: p.detach().clone() for k, p in params.items()} for _ in self.sigma_rels]
        self._continue_history(trainer)

    @rank_zero_only
    def _continue_history(self, trainer: pl.Trainer) -> None:
        """Make this run's snapshot folder hold the history up to the resumed step, no more: snapshots newer
        than it are dropped (written after the last checkpoint by the run that stopped), and when the run
        resumed from another run's checkpoint, that run's snapshots up to the step are linked (or copied) in.
        """
        import shutil

        step, folder = trainer.global_step, self.folder(trainer)
        for s, path in list_snapshots(folder):
            if s > step:
                path.unlink(missing_ok=True)
                log.info("phema: removed %s (newer than the resumed step %d)", path.name, step)
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if not ckpt_path or "://" in str(ckpt_path):
            return
        previous = Path(ckpt_path).resolve().parents[1] / self.dirname
        if not previous.is_dir() or previous == folder.resolve():
            return
        folder.mkdir(parents=True, exist_ok=True)
        linked = 0
        for s, path in list_snapshots(previous):
            target = folder / path.name
            if s <= step and not target.exists():
                try:
                    target.hardlink_to(path)
                except OSError:  # another file system, or links not allowed
                    shutil.copy2(path, target)
                linked += 1
        log.info("phema: %d snapshots up to step %d taken over from %s", linked, step, previous)

    def state_dict(self) -> dict[str, Any]:
        if self.profiles is None:
            return {}
        return {
            "sigma_rels": list(self.sigma_rels),
            "every_n_steps": self.every_n_steps,
            "profiles": [{k: v.detach().cpu() for k, v in p.items()} for p in self.profiles],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict) if state_dict else None

    # ----------------------------------------------------------------- update
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far (t of EDM2 Eq. 4)
        if self.profiles is None or step < 1 or step == self._last_update:
            return
        self._last_update = step
        params = self._params(pl_module)
        for gamma, profile in zip(self.gammas, self.profiles):
            keys = list(profile)
            power_ema_update_(
                [profile[k] for k in keys], [params[k].detach() for k in keys], power_ema_beta(gamma, step)
            )
        if step % self.every_n_steps == 0:
            self.snapshot(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.profiles is not None
            and trainer.global_step >= 1
            and trainer.global_step != self._last_snapshot
        ):
            self.snapshot(trainer, trainer.global_step)

    @rank_zero_only
    def snapshot(self, trainer: pl.Trainer, step: int) -> Path:
        """Write the profiles at ``step`` atomically, then thin the periodic snapshots to the bound."""
        assert self.profiles is not None
        folder = self.folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = snapshot_path(folder, step)
        atomic_torch_save(
            {
                "step": int(step),
                "sigma_rels": list(self.sigma_rels),
                "profiles": [{k: v.detach().cpu() for k, v in p.items()} for p in self.profiles],
            },
            path,
        )
        if self._last_snapshot < 0:
            size = path.stat().st_size
            log.info(
                "phema: snapshot of %d profiles %.2f MB; at most %d snapshots (%.1f MB) under %s",
                len(self.profiles),
                size / 2**20,
                self.max_snapshots + 1,
                size * (self.max_snapshots + 1) / 2**20,
                folder,
            )
        self._last_snapshot = step
        self._thin(folder)
        return path

    def _thin(self, folder: Path) -> None:
        periodic = [(s, p) for s, p in list_snapshots(folder) if s % self.every_n_steps == 0]
        while len(periodic) > self.max_snapshots:
            self.every_n_steps *= 2
            for s, p in periodic:
                if s % self.every_n_steps != 0:
                    p.unlink(missing_ok=True)
            periodic = [(s, p) for s, p in periodic if s % self.every_n_steps == 0]
            log.info("phema: %d snapshots kept, period now %d steps", len(periodic), self.every_n_steps)


# --------------------------------------------------------------------------- reconstruction


def list_snapshots(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot in ``folder``, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT.search(p.name))]
    return sorted(found)


def reconstruct_state(
    snapshots: Sequence[tuple[int, str | Path]], sigma_rel: float, step: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The power-function EMA of ``sigma_rel`` at ``step`` from saved snapshots (EDM2 App. C.2).

    Every profile of every snapshot at or before ``step`` (default: the last snapshot's) is one basis
    function p_i; :func:`solve_weights` gives the coefficients and the weights are sum_i x_i theta_hat_i,
    accumulated in float64 one snapshot at a time (memory: one snapshot plus the sum).

    Returns:
        (state, info): the reconstructed floating-point parameters by name, and
        ``{"step", "sigma_rel", "gamma", "snapshots", "coefficients", "coefficient_sum"}`` (the sum is one
        to rounding: :func:`solve_weights` normalises it).
    """
    from diffusion_lab.training.checkpoint import safe_torch_load

    gamma = sigma_rel_to_gamma(float(sigma_rel))  # validates sigma_rel
    if not snapshots:
        raise FileNotFoundError("no post-hoc EMA snapshots found: train with callbacks=phema first")
    steps = [int(s) for s, _ in snapshots]
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise ValueError(f"step={step} has no snapshot; choose one of {steps}")
    chosen = [(s, Path(p)) for s, p in snapshots if 0 < int(s) <= step]
    rels = [float(v) for v in safe_torch_load(chosen[0][1])["sigma_rels"]]
    coef = solve_weights([s for s, _ in chosen for _ in rels], rels * len(chosen), step, sigma_rel)
    state: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    i = 0
    for _, p in chosen:
        snap = safe_torch_load(p)
        if [float(v) for v in snap["sigma_rels"]] != rels:
            raise ValueError(f"snapshot {p} tracks sigma_rels {snap['sigma_rels']}, the first one {rels}")
        for profile in snap["profiles"]:  # accumulated in float64, one snapshot in memory at a time
            for k, v in profile.items():
                dtypes.setdefault(k, v.dtype)
                acc = state.setdefault(k, torch.zeros(v.shape, dtype=torch.float64))
                acc.add_(v.double(), alpha=float(coef[i]))
            i += 1
    state = {k: v.to(dtypes[k]) for k, v in state.items()}
    info = {
        "step": step,
        "sigma_rel": float(sigma_rel),
        "gamma": gamma,
        "snapshots": [str(p) for _, p in chosen],
        "coefficients": [float(c) for c in coef],
        "coefficient_sum": float(coef.sum()),
    }
    return state, info
