"""Gaussian diffusion: forward process, reverse process, losses and likelihood.

Notation (Ho et al. 2020 "DDPM"; Nichol & Dhariwal 2021 "Improved DDPM"):

    code name                        symbol                 meaning
    -------------------------------  ---------------------  ----------------------------------------
    betas                            beta_t                 forward noise variance of step t
    alphas_cumprod                   alpha_bar_t            prod_{s<=t} (1 - beta_s)
    alphas_cumprod_prev              alpha_bar_{t-1}        with alpha_bar_0 = 1
    posterior_variance               beta_tilde_t           (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    posterior_mean_coef1/2           mu_tilde coefficients  of x_0 and x_t      (DDPM Eq. 7)
    eps                              epsilon                standard normal noise
    snr                              SNR(t)                 alpha_bar_t / (1 - alpha_bar_t)

Index convention: ``t`` is a (B,) int64 tensor, 0-based, so ``t = 0`` is the paper's t = 1 (one step of
noise) and ``t = T - 1`` the last. The network is called as ``model_fn(x_t, t_model, y)`` where ``t_model``
is ``timestep_map[t]``: the identity, except for a respaced diffusion (Improved DDPM Sec. 4), whose
steps map back to the original training steps.

Tables are computed in float64 and stored as float32 buffers (non-persistent: they follow the schedule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_lab.processes.likelihood import (
    NATS_PER_BIT,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from diffusion_lab.processes.parameterization import PARAMETERIZATIONS, Parameterization, get_parameterization
from diffusion_lab.processes.paths import Coefs, DiscreteVPPath, GaussianPath
from diffusion_lab.processes.schedules import Schedule, betas_from_alphas_cumprod

__all__ = [
    "GaussianDiffusion",
    "PMeanVariance",
    "ModelFn",
    "VARIANCES",
    "LOSSES",
    "LOSS_WEIGHTINGS",
]

ModelFn = Callable[..., Tensor]  # model_fn(x_t (B,C,H,W), t (B,) int64, y=None) -> (B, C or 2C, H, W)

VARIANCES = ("fixed_small", "fixed_large", "learned_range", "learned")
LOSSES = ("simple", "vlb", "hybrid")
LOSS_WEIGHTINGS = ("none", "min_snr")


@dataclass
class PMeanVariance:
    """The reverse step p(x_{t-1} | x_t) = N(mean, variance) and the denoised predictions behind it."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_x0: Tensor
    pred_eps: Tensor


class GaussianDiffusion(nn.Module):
    """A discrete-time Gaussian diffusion built on a :class:`~diffusion_lab.processes.schedules.Schedule`.

    Args:
        schedule: the noise schedule (float64 betas).
        parameterization: what the network predicts: a name in ``PARAMETERIZATIONS`` (``eps``, ``x0``, ``v``)
            or a :class:`~diffusion_lab.processes.parameterization.Parameterization` instance.
        variance: reverse-process variance, one of
            ``fixed_small`` (beta_tilde_t),
            ``fixed_large`` (beta_t, with beta_tilde_2 at the first step, as DDPM's sigma^2 = beta),
            ``learned_range`` (Improved DDPM Eq. 15: exp(v log beta_t + (1 - v) log beta_tilde_t)),
            ``learned`` (the network outputs the log-variance directly).
            The learned ones need a network with twice the data channels (``model_out_channels``).
        loss: ``simple`` (MSE on the parameterization's target), ``vlb`` (the variational bound, an
            unbiased estimate of the full L_vlb in bits/dim) or ``hybrid`` (simple + lambda * vlb with the
            mean's gradient stopped in the vlb term, Improved DDPM Sec. 3.1). ``simple`` with a learned
            variance adds the same lambda * vlb term, since nothing else would train the variance.
        loss_weighting: ``none`` or ``min_snr`` (Hang et al. 2023: weight min(SNR, gamma) on the x_0 error).
        min_snr_gamma: gamma of min-SNR weighting.
        hybrid_lambda: lambda of the hybrid loss (0.001 in Improved DDPM).
        timestep_map: for a respaced diffusion, the original training step of each of its steps.
    """

    def __init__(
        self,
        schedule: Schedule,
        parameterization: str | Parameterization = "eps",
        variance: str = "fixed_small",
        loss: str = "simple",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        hybrid_lambda: float = 0.001,
        timestep_map: Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a processes.schedules.Schedule, got {type(schedule).__name__}")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance '{variance}'; valid: {', '.join(VARIANCES)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss '{loss}'; valid: {', '.join(LOSSES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"unknown loss_weighting '{loss_weighting}'; valid: {', '.join(LOSS_WEIGHTINGS)}"
            )
        if loss == "hybrid" and not variance.startswith("learned"):
            raise ValueError("loss 'hybrid' trains the variance: use variance=learned_range (or learned)")
        self.schedule = schedule
        self.parameterization = get_parameterization(parameterization)
        self.variance = variance
        self.loss_type = loss
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.hybrid_lambda = float(hybrid_lambda)

        betas = schedule.betas.to(torch.float64)
        T = betas.numel()
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        if alphas_cumprod[-1] == 0 and not self.parameterization.supports_zero_terminal_snr:
            able = [n for n, c in PARAMETERIZATIONS.items() if c.supports_zero_terminal_snr]
            raise ValueError(
                f"a zero-terminal-SNR schedule cannot be used with {self.parameterization.name}-prediction "
                f"(x_0 is undefined at alpha_bar_T = 0); use parameterization {' or '.join(able)} "
                "(Lin et al. 2024, Sec. 3.2)"
            )
        alphas_cumprod_prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta_tilde_1 = 0: clip the log at beta_tilde_2 (as Improved DDPM does); a one-step chain (a
        # sampler's steps=1) has no beta_tilde_2 and clips at beta_1.
        first = posterior_variance[1:2] if T > 1 else betas[:1]
        posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
        fixed_large_variance = torch.cat([first, betas[1:]])
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log1p(-alphas_cumprod),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            # DDPM Eq. 7: mu_tilde = coef1 x_0 + coef2 x_t
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
            * (1.0 - betas).sqrt()
            / (1.0 - alphas_cumprod),
            "fixed_large_variance": fixed_large_variance,
            "fixed_large_log_variance": torch.log(fixed_large_variance),
            "log_betas": torch.log(betas),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)
        if timestep_map is None:
            timestep_map = torch.arange(T)
        self.register_buffer("timestep_map", timestep_map.to(torch.long), persistent=False)

    # ------------------------------------------------------------------------------------------ helpers

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def learned_variance(self) -> bool:
        return self.variance.startswith("learned")

    def model_out_channels(self, data_channels: int) -> int:
        """Channels the network must output for data with ``data_channels`` channels."""
        return 2 * data_channels if self.learned_variance else data_channels

    def coef(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Gather table ``name`` at steps ``t`` (B,) and shape it (B, 1, ..., 1) to broadcast against x."""
        table: Tensor = getattr(self, name)
        out = table.to(x.device)[t.to(x.device)].to(x.dtype)
        return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    def coefs(self, t: Tensor, x: Tensor) -> Coefs:
        """alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t) at steps t (B,), each (B, 1, ..., 1).

        The parameterizations' discrete adapters read these (no derivatives: a step has none).
        """
        return Coefs(self.coef("sqrt_alphas_cumprod", t, x), self.coef("sqrt_one_minus_alphas_cumprod", t, x))

    # ------------------------------------------------------------------------- the continuous view

    def path(self) -> GaussianPath:
        """This schedule as a continuous path: step i at t = (i + 1) / T, log-SNR linear in t between."""
        return DiscreteVPPath(self.schedule.alphas_cumprod)

    def predict(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at continuous times t (B,) in [0, 1] of ``path()``, for
        x = alpha(t) x_0 + sigma(t) eps.

        The network runs at the step nearest to t in log-SNR (``DiscreteVPPath.nearest_step``), on x moved
        to that step's scale through the variance-exploding view: x_k = sqrt(alpha_bar_k) x / alpha(t) (as
        the sigma samplers round sigma to the model's steps, EDM App. C.3.2). eps_hat is then recomputed for
        x at t, so x = alpha(t) x0_hat + sigma(t) eps_hat holds exactly; at t = (k + 1) / T nothing is
        rounded.
        """
        path = self.path()
        c = path.coefs(t, x)
        k = path.nearest_step(t).to(x.device)
        x_k = self.coef("sqrt_alphas_cumprod", k, x) * x / c.alpha
        out = self.run_model(model_fn, x_k, k, y)
        pred, _ = self.split_output(out, x_k)
        x0, _ = self.parameterization.to_x0_eps(pred, x_k, k, self)
        return x0, (x - c.alpha * x0) / c.sigma

    def velocity(self, model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The probability-flow ODE drift dx/dt = d_alpha(t) x0_hat + d_sigma(t) eps_hat at continuous t (B,)
        of ``path()`` (see ``predict`` for how t meets the network's steps)."""
        c = self.path().coefs(t, x)
        x0, eps = self.predict(model_fn, x, t, y)
        return c.d_alpha * x0 + c.d_sigma * eps

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """t ~ Uniform{0, ..., T-1}, shape (batch,)."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def run_model(self, model_fn: ModelFn, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Call the network at this diffusion's step t (mapped to the training step for respaced ones)."""
        return model_fn(x_t, self.timestep_map.to(t.device)[t], y)

    def split_output(self, out: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the network output into (prediction, variance output or None)."""
        C = x_t.shape[1]
        if self.learned_variance:
            if out.shape[1] != 2 * C:
                raise ValueError(
                    f"variance '{self.variance}' needs a network with {2 * C} output channels, "
                    f"got {out.shape[1]}"
                )
            return out[:, :C], out[:, C:]
        if out.shape[1] != C:
            raise ValueError(f"variance '{self.variance}' needs {C} output channels, got {out.shape[1]}")
        return out, None

    # -------------------------------------------------------------------------------- forward process

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Moments of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (DDPM Eq. 4)."""
        mean = self.coef("sqrt_alphas_cumprod", t, x0) * x0
        var = self.coef("alphas_cumprod", t, x0).neg().add(1.0).expand_as(x0)
        log_var = self.coef("log_one_minus_alphas_cumprod", t, x0).expand_as(x0)
        return mean, var, log_var

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0):  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM Eq. 4).

        Args:
            x0:  (B, C, H, W) in [-1, 1].
            t:   (B,) int64, 0-based.
            eps: (B, C, H, W) ~ N(0, I).
        """
        a = self.coef("sqrt_alphas_cumprod", t, x0)  # (B, 1, 1, 1)
        s = self.coef("sqrt_one_minus_alphas_cumprod", t, x0)  # (B, 1, 1, 1)
        return a * x0 + s * eps

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)   (DDPM Eq. 6-7).

        Returns (mean, variance, clipped log-variance); at t = 0 the variance is 0 and the log-variance
        is clipped to log(beta_tilde) of the next step.
        """
        mean = (
            self.coef("posterior_mean_coef1", t, x_t) * x0 + self.coef("posterior_mean_coef2", t, x_t) * x_t
        )
        var = self.coef("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self.coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    # -------------------------------------------------------------------------------- reverse process

    def p_mean_variance(
        self,
        model_out: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> PMeanVariance:
        """p(x_{t-1} | x_t) from a network output: mean = mu_tilde(x0_hat, x_t), variance by ``variance``.

        Args:
            model_out: (B, C or 2C, H, W) network output at (x_t, t).
            clip_denoised: clamp x0_hat to [-1, 1] before forming the mean.
            denoised_fn: any other map applied to x0_hat (e.g. dynamic thresholding); after clipping.
        """
        pred, var_out = self.split_output(model_out, x_t)
        if self.variance == "fixed_small":
            log_var = self.coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        elif self.variance == "fixed_large":
            log_var = self.coef("fixed_large_log_variance", t, x_t).expand_as(x_t)
        elif self.variance == "learned_range":
            # Improved DDPM Eq. 15: Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), v = (out + 1) / 2
            frac = (var_out + 1.0) / 2.0
            log_max = self.coef("log_betas", t, x_t)
            log_min = self.coef("posterior_log_variance_clipped", t, x_t)
            log_var = frac * log_max + (1.0 - frac) * log_min
        else:  # learned: the network outputs log Sigma directly
            log_var = var_out
        pred_x0, pred_eps = self.parameterization.to_x0_eps(pred, x_t, t, self)
        if clip_denoised or denoised_fn is not None:
            if clip_denoised:
                pred_x0 = pred_x0.clamp(-1.0, 1.0)
            if denoised_fn is not None:
                pred_x0 = denoised_fn(pred_x0)
            pred_eps = self.eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return PMeanVariance(
            mean=mean, variance=log_var.exp(), log_variance=log_var, pred_x0=pred_x0, pred_eps=pred_eps
        )

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)   (inverse of DDPM Eq. 4)."""
        return (x_t - self.coef("sqrt_alphas_cumprod", t, x_t) * x0) / self.coef(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (DDPM Eq. 15)."""
        return (x_t - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / self.coef(
            "sqrt_alphas_cumprod", t, x_t
        )

    # ------------------------------------------------------------------------------ variational bound

    def vlb_terms(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The term L_{t-1} of the bound, in bits/dim, shape (B,)   (DDPM Eq. 5; Improved DDPM Eq. 4-6).

        For t > 0 (paper t > 1): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) between Gaussians.
        For t = 0 (paper t = 1): the discretized Gaussian decoder -log p(x_0 | x_1)  (DDPM Eq. 13).
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(model_out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / NATS_PER_BIT
        nll = -discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)
        nll = mean_flat(nll) / NATS_PER_BIT
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape (B,). Constant in the network."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return (
            mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / NATS_PER_BIT
        )

    # ------------------------------------------------------------------------------------------ losses

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor | None = None,
        eps: Tensor | None = None,
        y: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example training losses, each (B,).

        Returns a dict with ``loss`` (what to minimise) and, where computed, ``mse`` (the simple loss
        before weighting) and ``vlb`` (the L_t term in bits/dim, with the mean's gradient stopped for
        the hybrid loss).
        """
        B = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(B, device=x0.device)
        if eps is None:
            eps = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, eps)
        out = self.run_model(model_fn, x_t, t, y)
        pred, var_out = self.split_output(out, x_t)
        terms: dict[str, Tensor] = {}

        if self.loss_type in ("simple", "hybrid"):
            target = self.parameterization.target(x0, eps, t, self)
            mse = mean_flat((pred.float() - target.float()) ** 2)
            terms["mse"] = mse
            terms["loss"] = mse * self.loss_weights(t)
        if self.learned_variance or self.loss_type == "vlb":
            # Stop the mean's gradient in the vlb term unless the vlb is the whole objective.
            frozen = pred.detach() if self.loss_type != "vlb" else pred
            vlb_out = frozen if var_out is None else torch.cat([frozen, var_out], dim=1)
            vlb = self.vlb_terms(vlb_out.float(), x0.float(), x_t.float(), t)
            terms["vlb"] = vlb
            # T * L_t is an unbiased estimate of the full bound sum_t L_t (Improved DDPM Sec. 3.1).
            if self.loss_type == "vlb":
                terms["loss"] = vlb * self.num_timesteps
            else:
                terms["loss"] = terms["loss"] + self.hybrid_lambda * self.num_timesteps * vlb
        return terms

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-example weights of the simple loss, (B,).

        min_snr (Hang et al. 2023, Eq. 8): weight min(SNR_t, gamma) on ||x_0 - x0_hat||^2, rewritten in the
        parameterization's own error by ``Parameterization.x0_error_scale`` (eps: SNR, x0: 1, v: SNR + 1).
        """
        if self.loss_weighting == "none":
            return torch.ones(t.shape[0], device=t.device)
        snr = self.snr.to(t.device)[t]
        return snr.clamp(max=self.min_snr_gamma) / self.parameterization.x0_error_scale(snr)

    # ------------------------------------------------------------------------------------- likelihood

    @torch.no_grad()
    def bpd_bound(
        self, model_fn: ModelFn, x0: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The full negative log-likelihood bound in bits/dim: sum of all T terms plus the prior.

            -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0    (DDPM Eq. 5)

        Each term is evaluated at one draw of x_t ~ q(x_t | x_0). Returns per-example (B,) tensors
        ``total_bpd``, ``prior_bpd``, ``vb_bpd`` (sum of the T terms) and ``terms_bpd`` (B, T).
        """
        B = x0.shape[0]
        terms = []
        for i in range(self.num_timesteps):
            t = torch.full((B,), i, device=x0.device, dtype=torch.long)
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, eps)
            out = self.run_model(model_fn, x_t, t, y)
            terms.append(self.vlb_terms(out.float(), x0.float(), x_t.float(), t))
        terms_t = torch.stack(terms, dim=1)
        prior = self.prior_bpd(x0)
        vb = terms_t.sum(dim=1)
        return {"total_bpd": vb + prior, "prior_bpd": prior, "vb_bpd": vb, "terms_bpd": terms_t}

    @torch.no_grad()
    def bpd_estimate(
        self, model_fn: ModelFn, x0: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Unbiased Monte Carlo estimate of the bound, (B,): T * L_t at one uniform t per example + L_T."""
        B = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, eps)
        out = self.run_model(model_fn, x_t, t, y)
        return self.num_timesteps * self.vlb_terms(out.float(), x0.float(), x_t.float(), t) + self.prior_bpd(
            x0
        )

    # -------------------------------------------------------------------------------------- respacing

    def respace(self, use_timesteps: Iterable[int]) -> GaussianDiffusion:
        """A diffusion over a subset of steps (Improved DDPM Sec. 4, "improving sampling speed").

        Keeps alpha_bar at the chosen steps and rebuilds betas from them, beta_i = 1 - alpha_bar_{k_i} /
        alpha_bar_{k_{i-1}}, so every sampler works on the shorter chain unchanged; the network still sees
        the original step numbers through ``timestep_map``. Any subset works; the named grids that choose
        one are in ``diffusion_lab.samplers.timesteps``.
        """
        keep = sorted(set(int(k) for k in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respace: steps must lie in [0, {self.num_timesteps - 1}], got {keep[:3]}...")
        ab = torch.cumprod(1.0 - self.schedule.betas.to(torch.float64), 0)[keep]
        betas = betas_from_alphas_cumprod(ab)
        schedule = Schedule(name=f"{self.schedule.name}[respaced {len(keep)}]", betas=betas)
        old_map = self.timestep_map.cpu()
        return GaussianDiffusion(
            schedule,
            self.parameterization,
            self.variance,
            self.loss_type,
            self.loss_weighting,
            self.min_snr_gamma,
            self.hybrid_lambda,
            timestep_map=old_map[torch.tensor(keep)],
        ).to(self.betas.device)

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule.name}, T={self.num_timesteps}, parameterization="
            f"{self.parameterization.name}, variance={self.variance}, loss={self.loss_type}"
        )
