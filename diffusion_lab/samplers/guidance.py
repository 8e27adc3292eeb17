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

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["AutoGuidance", "check_guide"]

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


# Run-config entries that must agree between a model and its guide: the data, and the noise process and
# parameterization that turn the network output into a denoiser. The architecture may differ.
GUIDE_KEYS = (
    "dataset.name",
    "dataset.image_size",
    "dataset.channels",
    "class_conditional",
    "objective._target_",
    "objective.parameterization",
    "objective.variance",
    "objective.sigma_data",
    "objective.sigma_min",
    "objective.sigma_max",
    "objective.discrete_steps",
    "schedule",
)


def _select(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


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
    edm = "edm" in str(_select(main_cfg, "objective._target_")).lower()
    for key in GUIDE_KEYS:
        if key == "schedule" and edm:  # EDM's continuous noise levels do not use the schedule group
            continue
        a, b = _select(guide_cfg, key), _select(main_cfg, key)
        if a != b:
            diffs.append(f"{key} {a!r} vs {b!r}")
    if diffs:
        raise ValueError(
            f"guide {guide_path} does not fit the model (guide vs model): {'; '.join(diffs)}; "
            "autoguidance needs a guide of the same data and diffusion (a smaller or less-trained model)"
        )
