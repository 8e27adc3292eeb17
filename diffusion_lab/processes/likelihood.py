"""Pure likelihood functions used by the variational bound (no state, no schedule).

All log-likelihoods are in nats; divide by ``log(2)`` and the number of dimensions for bits/dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "NATS_PER_BIT",
]

NATS_PER_BIT = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

        KL = 1/2 [ -1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) ]

    Arguments broadcast against each other.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) through the tanh approximation used by Ho et al. 2020 (max error ~1e-4 in probability)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) exactly, through erf."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: Tensor, means: Tensor, log_scales: Tensor, num_bins: int = 256, exact_cdf: bool = True
) -> Tensor:
    """log p(x | means, scales) of a Gaussian discretized into ``num_bins`` bins on [-1, 1].

    The decoder of Ho et al. 2020, Eq. 13: bin ``k`` of data scaled to [-1, 1] is the interval
    [x - 1/(num_bins-1), x + 1/(num_bins-1)] (width 2/255 for 8-bit data); the first bin extends
    to -inf and the last to +inf, so the probabilities of all ``num_bins`` values sum to 1.

    Args:
        x: (B, ...) data already scaled to [-1, 1], on the bin centres.
        means, log_scales: broadcastable to ``x``; log_scales = log(std).
        exact_cdf: use erf (True) or the tanh approximation of the reference code (False).
    Returns:
        (B, ...) log-probabilities in nats.
    """
    cdf = standard_normal_cdf if exact_cdf else approx_standard_normal_cdf
    half_bin = 1.0 / (num_bins - 1)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + half_bin))
    cdf_min = cdf(inv_std * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # log P(X <= upper) for the first bin
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # log P(X > lower) for the last bin
    cdf_delta = cdf_plus - cdf_min
    log_mid = torch.log(cdf_delta.clamp(min=1e-12))
    edge = 1.0 - half_bin  # values above/below this are the outermost bins (up to rounding)
    log_probs = torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_mid))
    return log_probs
