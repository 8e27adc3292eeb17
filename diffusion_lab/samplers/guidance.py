"""Autoguidance (Karras et al. 2024b, "Guiding a Diffusion Model with a Bad Version of Itself"): a wrapper of
the network, so every sampler gets it without a new argument.

    D_w(x; sigma) = D_guide(x; sigma) + w (D_main(x; sigma) - D_guide(x; sigma))    (Karras et al. 2024b)

Why wrapping the network output is the same thing: at a fixed (x_t, t) every linear parameterization turns
the network output ``out`` into the denoiser by an affine map D = c_skip(t) x_t + c_out(t) out,

    eps (Ho et al. 2020):    D = (x_t - sqrt(1 - alpha_bar) out) / sqrt(alpha_bar)
    x0:                      D = out
    v (Salimans & Ho 2022):  D = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) out
    F (EDM, Karras et al. 2022, Eq. 7):  D = c_skip x + c_out F(c_in x; c_noise)

and with weights that sum to one (w + (1 - w) = 1) the c_skip x_t terms cancel:

    c_skip x + c_out (out_g + w (out_m - out_g)) = D_g + w (D_m - D_g).

So the guided output out_g + w (out_m - out_g) gives the guided denoiser, and with it the guided eps / score /
velocity, in every sampler. For learned-variance (hybrid) outputs only the prediction channels are guided;
the variance channels come from the main model (as classifier-free guidance does with the conditional half).
Both networks see the same (x_t, t, y): autoguidance composes with class labels and with classifier-free
guidance (the sampler's ``guidance_scale`` then combines two autoguided outputs). w = 1 calls the main
network alone and is unguided sampling exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import get_object
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.edm import EDMDiffusion
from diffusion_lab.processes.flow import FlowMatching
from diffusion_lab.processes.parameterization import get_parameterization, get_prediction

__all__ = ["AutoGuidance", "check_guide", "guide_settings", "FREE_SETTINGS"]

ModelFn = Callable[..., Tensor]


class AutoGuidance:
    """``model_fn(x_t, t, y)`` that returns out_guide + w (out_main - out_guide) on the first C channels.

    Args:
        main: the model being sampled, ``main(x_t, t, y) -> (B, C or 2C, H, W)``.
        guide: a weaker model of the same task (same data, diffusion and parameterization; smaller or trained
            less), same signature.
        weight: w >= 1 in practice (Karras et al. 2024b use 1.4 to 2.5); 1 = no guidance.
    Attributes not defined here (``num_classes`` for the null label of classifier-free guidance, ...) are read
    from ``main``.
    """

    def __init__(self, main: ModelFn, guide: ModelFn, weight: float):
        weight = float(weight)
        if not torch.isfinite(torch.tensor(weight)):
            raise ValueError(f"guide_weight={weight} is not a finite number: give e.g. 2.0 (1 = no guidance)")
        self.main, self.guide, self.weight = main, guide, weight

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out_main = self.main(x_t, t, y)
        if self.weight == 1.0:
            return out_main
        out_guide = self.guide(x_t, t, y)
        C = x_t.shape[1]
        if out_guide.shape != out_main.shape:
            raise ValueError(
                f"the guide's output {tuple(out_guide.shape)} differs from the main model's "
                f"{tuple(out_main.shape)}: use a guide trained with the same objective"
            )
        guided = out_guide[:, :C] + self.weight * (out_main[:, :C] - out_guide[:, :C])
        return torch.cat([guided, out_main[:, C:]], dim=1)

    def __getattr__(self, name: str) -> Any:
        if name == "main":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.main, name)


# What a guide must share with the model. Both networks see the same (x_t, t_model, y) and the main model's
# process turns their outputs into one denoiser, so every setting that fixes what the network's input and
# output mean must agree: the data, and every argument of the objective's class except those listed here per
# family (the most specific class first), which change what is trained or how it is sampled, not what the
# output means. An argument added to a class later is compared until it is listed here.
#   discrete: t_model is a step of the schedule's chain (so the schedule group is compared as well) and the
#       output is the parameterization's (with the variance channels); the loss and its weighting are free.
#   EDM: the network sees c_in x and c_noise(sigma) and outputs F, all fixed by sigma_data (Karras et al.
#       2022, Eq. 7); the training density (P_mean, P_std) and the samplers' grid are free.
#   flow / interpolant: the network sees x_t of ``path`` and time_scale t, and outputs ``prediction``; the
#       time density, loss weighting, t_eps, sampling interval, coupling and discrete view are free (the
#       schedule group is not used).
DATA_KEYS = ("dataset.name", "dataset.image_size", "dataset.channels", "class_conditional")
_BUILT = ("schedule", "times", "sigmas", "timestep_map")  # passed by the builder or by respacing, not configs
# (objective class, uses the schedule group, its arguments free to differ)
FREE_SETTINGS: tuple[tuple[type, bool, frozenset[str]], ...] = (
    (
        FlowMatching,
        False,
        frozenset(
            {
                *_BUILT,
                *("time_density", "loc", "scale", "mode_scale", "P_mean", "P_std", "shift"),
                *("loss_weighting", "min_snr_gamma", "t_eps", "sample_eps", "coupling", "discrete_steps"),
            }
        ),
    ),
    (
        EDMDiffusion,
        False,
        frozenset({*_BUILT, "P_mean", "P_std", "sigma_min", "sigma_max", "rho", "discrete_steps"}),
    ),
    (
        GaussianDiffusion,
        True,
        frozenset({*_BUILT, "loss", "loss_weighting", "min_snr_gamma", "hybrid_lambda"}),
    ),
)
# names with aliases (prediction: noise = eps), compared by what they build
_CANONICAL = {"prediction": get_prediction, "parameterization": get_parameterization}


def _select(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _target(node: Any) -> Any:
    """The function or class a config node's ``_target_`` names (None where it names none importable)."""
    try:
        return get_object(str(node["_target_"]))
    except Exception:
        return None


def _arguments(node: Any) -> dict[str, Any]:
    """A ``_target_`` node's arguments: its own values over its target's defaults (a config written before
    an argument existed holds that argument's default)."""
    if not isinstance(node, Mapping):
        return {}
    out: dict[str, Any] = {}
    target = _target(node)
    if target is not None:
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            params = []
        out = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    out.update({k: v for k, v in node.items() if not str(k).startswith("_")})
    return out


def _canonical(name: str, value: Any) -> Any:
    try:
        return _CANONICAL[name](value).name if name in _CANONICAL else value
    except (ValueError, TypeError):
        return value


def guide_settings(cfg: Mapping) -> dict[str, Any]:
    """The run-config settings that fix what a model's network output means, ``{"dotted.key": value}``.

    The data (``DATA_KEYS``), ``objective._target_``, the objective's arguments other than its family's
    ``FREE_SETTINGS`` (defaults filled in, aliases resolved) and, for the discrete family, the schedule
    group's. A target that is no known objective keeps every argument and the schedule.
    """
    out = {key: _select(cfg, key) for key in DATA_KEYS}
    objective = _select(cfg, "objective")
    out["objective._target_"] = _select(cfg, "objective._target_")
    cls = _target(objective) if isinstance(objective, Mapping) else None
    family = next(
        ((s, f) for c, s, f in FREE_SETTINGS if isinstance(cls, type) and issubclass(cls, c)),
        (True, frozenset()),
    )
    uses_schedule, free = family
    for name, value in sorted(_arguments(objective).items()):
        if name not in free:
            out[f"objective.{name}"] = _canonical(name, value)
    if uses_schedule:
        schedule = _arguments(_select(cfg, "schedule"))
        out["schedule._target_"] = _select(cfg, "schedule._target_")
        out.update({f"schedule.{k}": v for k, v in sorted(schedule.items())})
    return out


def check_guide(
    main_cfg: Mapping,
    main_shape: tuple[int, ...],
    main_classes: int,
    guide_cfg: Mapping,
    guide_shape: tuple[int, ...],
    guide_classes: int,
    guide_path: str = "guide_ckpt",
) -> None:
    """Raise a one-line ValueError naming every setting where the guide does not fit the main model.

    The settings compared are :func:`guide_settings`; the architecture, training length and every setting
    that changes only how a model was trained or is sampled may differ.

    Args:
        main_cfg, guide_cfg: the two checkpoints' resolved run configs (plain dicts or DictConfigs).
        main_shape, guide_shape: (C, H, W) of the images each was trained on.
        main_classes, guide_classes: classes of each one's data.
    """
    diffs = []
    if tuple(main_shape) != tuple(guide_shape):
        diffs.append(f"image shape {tuple(guide_shape)} vs {tuple(main_shape)}")
    conditional = bool(_select(main_cfg, "class_conditional"))
    if conditional and int(main_classes) != int(guide_classes):
        diffs.append(f"classes {guide_classes} vs {main_classes}")
    main, guide = guide_settings(main_cfg), guide_settings(guide_cfg)
    same_objective = main["objective._target_"] == guide["objective._target_"]
    for key in dict.fromkeys([*main, *guide]):
        if not same_objective and key != "objective._target_" and key.startswith(("objective.", "schedule.")):
            continue  # another objective class: its own settings are not comparable, the class is named
        a, b = guide.get(key), main.get(key)
        if a != b:
            diffs.append(f"{key} {a!r} vs {b!r}")
    if diffs:
        raise ValueError(
            f"guide {guide_path} does not fit the model (guide vs model): {'; '.join(diffs)}; "
            "autoguidance needs a guide of the same data and diffusion (a smaller or less-trained model)"
        )
