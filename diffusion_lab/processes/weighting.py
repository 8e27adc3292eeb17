"""Loss weightings, expressed once in eps units (Kingma & Gao 2023, "Understanding Diffusion Objectives as
the ELBO with Simple Data Augmentation", Sec. 2 and App. D).

Every objective here is an MSE on some prediction P of the network, at x_t = alpha x_0 + sigma eps, with t
drawn from a density p(t). At fixed x_t an error in P is a fixed multiple of the error in eps
(``Parameterization.eps_error_scale``, c_P), so

    E_t w(t) ||P - P_hat||^2 = E_t [w(t) c_P(t)] ||eps - eps_hat||^2,

and the weighting of Kingma & Gao over lambda = log-SNR is w_KG(lambda) = p_lambda(lambda) w(t) c_P(t), with
p_lambda(lambda) = p(t) / |d lambda / dt| (``kingma_gao_weight``).

A weighting name says in which units the MSE is measured (``weight``):

    default    SiT's loss for the prediction (willisma/SiT ``Transport.training_losses``, weight None):
               eps units for score (||sigma s_hat + eps||^2), the prediction's own units otherwise
    none       the prediction's own units (w = 1): plain flow matching / DDPM L_simple; for a score network
               ||s_hat - s||^2 = ||eps_hat - eps||^2 / sigma^2, dominated by the draws nearest t = 0
    eps        the eps error (w = 1 / c_P): DDPM's L_simple whatever the network predicts
    x0         the x_0 error, velocity the velocity error, score the score error (w = c_Q / c_P)
    likelihood the ELBO's weighting in eps units, -(1/2) d lambda / dt = d_sigma / sigma - d_alpha / alpha
               (Kingma et al. 2021, VDM Eq. 17; SiT's "likelihood", sigma d_sigma - sigma^2 d_alpha / alpha
               over sigma^2): with uniform t the loss is the continuous-time ELBO's diffusion term
    min_snr    min(SNR, gamma) on the x_0 error (Hang et al. 2023, Eq. 8)
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_lab.processes.parameterization import (
    Parameterization,
    ScorePrediction,
    VelocityPrediction,
    X0Prediction,
)
from diffusion_lab.processes.paths import Coefs, GaussianPath

__all__ = ["WEIGHTINGS", "weight", "default_weighting", "kingma_gao_weight"]

WEIGHTINGS = ("default", "none", "eps", "x0", "velocity", "score", "likelihood", "min_snr")
_UNITS = {"x0": X0Prediction(), "velocity": VelocityPrediction(), "score": ScorePrediction()}


def default_weighting(prediction: Parameterization) -> str:
    """SiT's weighting for a prediction: ``eps`` for score (||sigma s_hat + eps||^2), else ``none``."""
    return "eps" if prediction.name == "score" else "none"


def weight(name: str, prediction: Parameterization, c: Coefs, min_snr_gamma: float = 5.0) -> Tensor:
    """w(t) multiplying ||P - P_hat||^2 so that the loss is measured in the units ``name`` (see top)."""
    if name == "default":
        name = default_weighting(prediction)
    if name == "none":
        return torch.ones_like(c.alpha)
    own = prediction.eps_error_scale(c)
    if name == "eps":
        return 1.0 / own
    if name in _UNITS:
        return _UNITS[name].eps_error_scale(c) / own
    if name == "likelihood":
        d_alpha, d_sigma = c.derivatives()
        return (d_sigma / c.sigma - d_alpha / c.alpha) / own
    if name == "min_snr":
        snr = (c.alpha / c.sigma) ** 2
        return snr.clamp(max=min_snr_gamma) * X0Prediction().eps_error_scale(c) / own
    raise ValueError(f"unknown loss_weighting '{name}'; valid: {', '.join(WEIGHTINGS)}")


def kingma_gao_weight(
    path: GaussianPath, pdf_t: Tensor, t: Tensor, prediction: Parameterization, w: Tensor
) -> Tensor:
    """w_KG(lambda(t)) = p(t) / |d lambda / dt| w(t) c_P(t): the objective as a weighted eps-loss over
    log-SNR (Kingma & Gao 2023, Eq. 7 with p_lambda). t, pdf_t, w: (B,). d lambda / dt is the path's
    analytic derivative (finite on the open interval; a finite difference would step outside [0, 1])."""
    t64 = t.to(torch.float64)
    dlam = path.d_log_snr(t64)
    c = path.coefs(t64, t64[:, None])
    return (
        pdf_t.to(torch.float64) / dlam.abs() * w.to(torch.float64) * prediction.eps_error_scale(c)[:, 0]
    ).to(t.dtype)
