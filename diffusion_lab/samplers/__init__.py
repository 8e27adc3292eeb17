"""Samplers: free functions with one signature (see ``common``), the registry, and a one-call helper.

Usage:

    from diffusion_lab.samplers import sample
    x0, nfe = sample(model, diffusion, (16, 1, 28, 28), sampler="dpm_solver", steps=20, grid="karras",
                     seed=0, return_nfe=True)

Samplers (``SAMPLERS`` / ``get_sampler(name)``):

    ddpm        ancestral sampling, DDPM Algorithm 2 (the diffusion's variance)
    ddim        DDIM Eq. 12 / 16, eta in [0, 1]
    dpm_solver  DPM-Solver++(2M), Lu et al. 2022b Algorithm 2
    euler       Euler in sigma, EDM (Karras et al. 2022) Algorithm 2 without the correction
    heun        Heun's 2nd-order method in sigma, EDM Algorithm 2 (stochastic churn optional)
    euler_maruyama  Euler-Maruyama on the path's reverse SDE (SiT's sample_sde), diffusion_form selectable

Each takes ``steps`` (network evaluations) and ``grid`` (which training steps, ``GRIDS`` / ``make_grid`` in
``timesteps``: uniform, leading, trailing, time_uniform, logsnr_uniform, karras), chosen independently.

Count network evaluations with ``sample(..., return_nfe=True)`` or by wrapping a model in ``NFECounter``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion, ModelFn
from diffusion_lab.samplers.common import NFECounter, dynamic_thresholding, guided_model_output, resolve_steps
from diffusion_lab.samplers.ddim import ddim_sample
from diffusion_lab.samplers.ddpm import ddpm_sample
from diffusion_lab.samplers.dpm_solver import dpm_solver_sample
from diffusion_lab.samplers.edm import euler_sample, heun_sample
from diffusion_lab.samplers.sde import euler_maruyama_sample
from diffusion_lab.samplers.timesteps import GRIDS, karras_sigmas, make_grid

__all__ = [
    "SAMPLERS",
    "PATH_SAMPLERS",
    "get_sampler",
    "sample",
    "ddpm_sample",
    "ddim_sample",
    "dpm_solver_sample",
    "euler_sample",
    "heun_sample",
    "euler_maruyama_sample",
    "NFECounter",
    "dynamic_thresholding",
    "guided_model_output",
    "resolve_steps",
    "GRIDS",
    "make_grid",
    "karras_sigmas",
]

SamplerFn = Callable[..., Tensor]

SAMPLERS: dict[str, SamplerFn] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm_solver": dpm_solver_sample,
    "euler": euler_sample,
    "heun": heun_sample,
}
# Samplers in continuous time on the model's path (not on a grid of its discrete steps).
PATH_SAMPLERS: dict[str, SamplerFn] = {"euler_maruyama": euler_maruyama_sample}


def get_sampler(name: str) -> SamplerFn:
    """The sampler function registered under ``name``."""
    if name in PATH_SAMPLERS:
        return PATH_SAMPLERS[name]
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; valid names: {', '.join([*SAMPLERS, *PATH_SAMPLERS])}")
    return SAMPLERS[name]


def sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    sampler: str | SamplerFn = "ddpm",
    steps: int | str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    return_nfe: bool = False,
    **kwargs,
) -> Tensor | tuple[Tensor, int]:
    """Draw x_T ~ N(0, I) from a seeded ``torch.Generator`` and run a sampler from it.

    The same generator then supplies the sampler's noise, so (seed, sampler, steps) fixes the samples.

    Args:
        model_fn: ``model_fn(x_t, t, y)``, e.g. the network (put it on ``device`` and in eval mode first).
        diffusion: the trained diffusion.
        shape: (B, C, H, W) of the samples.
        sampler: a name in ``SAMPLERS`` or a sampler function (e.g. a Hydra ``_partial_`` of one).
        steps: None = all T steps or an int n (passed to the sampler only when given, so a partial's own
            ``steps`` stays in force); the grid is a sampler keyword (``grid="trailing"``).
        seed: seed of the generator; device: where x_T and the noise live (the model's device).
        return_nfe: also return the number of network evaluations (a guided step counts once).
        **kwargs: the sampler's keywords (y, guidance_scale, clip_denoised, eta, ...).
    Returns:
        (B, C, H, W) samples, or (samples, nfe) with ``return_nfe``.
    """
    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    x_T = torch.randn(tuple(shape), generator=generator, device=device)
    counter = NFECounter(model_fn)
    if steps is not None:
        kwargs["steps"] = steps
    x0 = fn(counter, diffusion, x_T, generator=generator, **kwargs)
    return (x0, counter.nfe) if return_nfe else x0
