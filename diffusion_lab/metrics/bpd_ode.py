"""Bits/dim of real images from the probability-flow ODE, over a whole set: the ``bpd_ode`` metric.

    python -m diffusion_lab.evaluate ckpt=PATH metrics=[bpd_ode] bpd_n=256 bpd_ode.n_probes=1

Each image gets one dequantization and its own Hutchinson probes, so the mean over images estimates the
dequantized bound (an UPPER BOUND on the discrete model's bits/dim, ``processes/likelihood_ode.py``) and its
standard error covers both sources of noise. The math is :func:`~diffusion_lab.processes.likelihood_ode.
model_bpd_ode`; this module only loops, times and summarises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch import Tensor

from diffusion_lab.processes.likelihood_ode import model_bpd_ode, require_flow
from diffusion_lab.utils.progress import track

__all__ = ["ode_bpd_over_images", "ODE_OPTION_KEYS"]

ODE_OPTION_KEYS = ("divergence", "probes", "n_probes", "method", "rtol", "atol", "steps", "dequantization")


def ode_bpd_over_images(
    objective,
    model,
    images: Tensor,
    labels: Tensor | None,
    batch_size: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    options: Mapping | None = None,
) -> dict[str, float]:
    """Bits/dim from the probability-flow ODE of uint8 ``images`` (N, C, H, W), ``batch_size`` at a time.

    Args:
        objective: has ``path()`` and ``velocity(model, x, t, y)`` (else a one-line error).
        model: the network the objective calls.
        labels: (N,) labels passed to the model (class-conditional models: log p(x | y)), or None.
        options: keys of :data:`ODE_OPTION_KEYS` (solver, divergence, dequantization), see ``ode_nll``.
    Returns:
        ``bpd_ode`` (mean), ``bpd_ode_stderr`` (standard error over images), ``bpd_ode_nfe`` (drift
        evaluations per image, averaged over batches), ``bpd_ode_images`` and ``bpd_ode_seconds_per_image``.
    """
    require_flow(objective)
    options = dict(options or {})
    unknown = sorted(set(options) - set(ODE_OPTION_KEYS))
    if unknown:
        raise ValueError(f"bpd_ode: unknown option(s) {unknown}; valid: {list(ODE_OPTION_KEYS)}")
    if options.get("steps") is not None and options.get("method", "dopri5") == "dopri5":
        options["method"] = "heun"  # steps=N alone means a fixed grid
    g = torch.Generator(device=device).manual_seed(int(seed))
    per_image, nfes, start = [], [], time.perf_counter()
    batches = range(0, len(images), batch_size)
    for i in track(batches, "bits/dim (probability-flow ODE)"):
        y = labels[i : i + batch_size].to(device) if labels is not None else None
        bpd, nfe = model_bpd_ode(objective, model, images[i : i + batch_size].to(device), y, g, **options)
        per_image.append(bpd.detach().cpu().double())
        nfes.append(nfe)
    values = torch.cat(per_image)
    n = len(values)
    return {
        "bpd_ode": values.mean().item(),
        "bpd_ode_stderr": values.std().item() / math.sqrt(n) if n > 1 else float("nan"),
        "bpd_ode_nfe": sum(nfes) / len(nfes),
        "bpd_ode_images": n,
        "bpd_ode_seconds_per_image": (time.perf_counter() - start) / n,
    }
