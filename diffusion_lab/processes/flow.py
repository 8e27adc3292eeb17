"""Flow matching and stochastic interpolants on a Gaussian path (``objective=flow`` and ``interpolant``).

    x_t = alpha(t) x_0 + sigma(t) eps,   t ~ p(t),   loss = w(t) ||P_theta(x_t, t) - P(x_0, eps, t)||^2

* ``objective=flow``: conditional flow matching (Lipman et al. 2023, Eq. 9 and 23) on the linear path
  (rectified flow, Liu et al. 2023), velocity target u = eps - x_0, logit-normal t (Esser et al. 2024, SD3
  Sec. 3.1 and Eq. 19). Data at t = 0 as in this project (Lipman's and SiT's t is 1 - t here).
* ``objective=interpolant``: SiT's grid (Ma et al. 2024, Sec. 2): path linear or gvp, prediction velocity,
  noise or score, uniform t. SiT's defaults follow from the prediction (``SIT_DEFAULTS``, willisma/SiT
  ``create_transport`` and ``Transport.training_losses``): the loss ||u_hat - u||^2 for velocity,
  ||eps_hat - eps||^2 for noise and ||sigma s_hat + eps||^2 (eps units) for score; training and sampling
  times in [eps, 1 - eps] with eps = 1e-3 for noise and score (their conversions divide by alpha, which is 0
  at t = 1 on both paths) and eps = 0 for velocity (finite everywhere).

The interval on which the probability-flow ODE of a model is well defined, ``ode_interval()``, is
[max(t_min, sample_eps), min(t_max, 1 - sample_eps)] within the path's range: the likelihood integrates over
it and every sampler starts at its upper end (SiT's ``check_interval``).

The network sees (x_t, t * time_scale, y); time_scale = 1000 puts t on the discrete models' step range (SD3
feeds 1000 t as well). P is a parameterization of ``processes.parameterization`` (velocity, noise = eps,
score, x0), the weighting one of ``processes.weighting`` and the density one of ``processes.time_sampling``.

Optional minibatch optimal-transport coupling (OT-CFM, Tong et al. 2023, Alg. 3): within a batch, the noise
is re-paired with the data by the exact OT plan for the squared distance. Between two uniform empirical
measures of the same size the exact plan is a permutation (Birkhoff), so ``scipy.optimize.
linear_sum_assignment`` solves it exactly, as POT's ``ot.emd`` would, without a new dependency.

Sampling. Every sampler runs on this objective:

* euler / heun (``samplers.edm``) call ``denoise(model_fn, x, sigma)``, k-diffusion's D(x; sigma) in the
  variance-exploding view x = x_t / alpha, sigma = sigma(t) / alpha(t), at any continuous sigma;
* ddpm / ddim / dpm_solver run on a discrete view (as for EDM): ``discrete_steps`` times
  t_i = (i + 1) / T * t_top with alpha_bar_i = alpha^2 / (alpha^2 + sigma^2), the variance-preserving
  rescaling x_vp = x_t / sqrt(alpha^2 + sigma^2) of the same path; the network is evaluated exactly at t_i
  and its output turned into x_0 (the view's parameterization is x0);
* euler_maruyama (``samplers.sde``) integrates SiT's SDE with ``velocity`` and the score.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from diffusion_lab.processes.diffusion import GaussianDiffusion, ModelFn
from diffusion_lab.processes.likelihood import mean_flat
from diffusion_lab.processes.parameterization import Parameterization, X0Prediction, get_prediction
from diffusion_lab.processes.paths import GaussianPath, get_path
from diffusion_lab.processes.schedules import Schedule, betas_from_alphas_cumprod
from diffusion_lab.processes.time_sampling import make_time_density
from diffusion_lab.processes.weighting import default_weighting, weight

__all__ = ["FlowMatching", "ot_pairing", "sit_eps"]

COUPLINGS = ("none", "ot")


def sit_eps(path: GaussianPath, prediction: Parameterization) -> tuple[float, float]:
    """SiT's (train_eps, sample_eps) for a path and prediction (``create_transport`` in willisma/SiT):
    velocity on the linear and GVP paths is finite everywhere (0, 0); every other prediction divides by alpha
    or sigma at an end (1e-3, 1e-3); the VP-SDE's own t_min = 1e-5 is SiT's VP train_eps, sample_eps 1e-3.
    The VE path (alpha = 1, sigma >= sigma_min > 0) has no singular end (0, 0)."""
    if path.name == "vp_sde":
        return 1e-5, 1e-3
    if path.name == "ve" or prediction.name == "velocity":
        return 0.0, 0.0
    return 1e-3, 1e-3


def ot_pairing(x0: Tensor, eps: Tensor) -> Tensor:
    """eps re-ordered so that sum_i ||x0_i - eps_i||^2 is minimal (exact minibatch OT, Tong et al. 2023)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).double(), eps.flatten(1).double()) ** 2
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return eps[torch.as_tensor(cols, device=eps.device)]


class FlowMatching(GaussianDiffusion):
    """A Gaussian-path objective with a velocity, noise, score or x0 network, and a discrete view for the
    discrete samplers.

    Args:
        schedule: accepted for the builder's contract and not used (the path is continuous).
        path: ``linear`` | ``gvp`` | ``vp_sde`` | ``ve`` (``processes.paths``).
        prediction: ``velocity`` | ``noise`` | ``score`` | ``x0``: what the network outputs.
        time_density: ``uniform`` | ``logit_normal`` | ``mode`` | ``lognormal`` with its options loc, scale
            (logit-normal), mode_scale (mode), P_mean, P_std (lognormal) and shift (SD3's shift, 1 = none).
        loss_weighting: the units of the MSE, ``processes.weighting.WEIGHTINGS``; ``default`` is SiT's for
            the prediction (eps units for score, the prediction's own units otherwise).
        min_snr_gamma: gamma of ``loss_weighting=min_snr``.
        t_eps: training times lie in [t_eps, 1 - t_eps] within the path's range (SiT's train_eps; None:
            SiT's default, :func:`sit_eps`); the draws of the density are mapped affinely onto it.
        sample_eps: the ODE interval and the samplers' start are [sample_eps, 1 - sample_eps] within the
            path's range (SiT's sample_eps; None: :func:`sit_eps`).
        time_scale: the network sees t * time_scale.
        coupling: ``none`` (independent pairs) or ``ot`` (minibatch OT).
        discrete_steps: T of the discrete view.
        times: the discrete view's times (T,), ascending; default (i + 1) / T * t_top.
        timestep_map: for a respaced view, the index of each of its steps in the original grid.
    """

    has_likelihood = False  # no variational bound; the ODE likelihood goes through path() and velocity()

    def __init__(
        self,
        schedule: Schedule | None = None,
        path: str = "linear",
        prediction: str = "velocity",
        time_density: str = "logit_normal",
        loc: float = 0.0,
        scale: float = 1.0,
        mode_scale: float = 1.29,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        shift: float = 1.0,
        loss_weighting: str = "default",
        min_snr_gamma: float = 5.0,
        t_eps: float | None = None,
        sample_eps: float | None = None,
        time_scale: float = 1000.0,
        coupling: str = "none",
        discrete_steps: int = 1000,
        times: Tensor | None = None,
        timestep_map: Tensor | None = None,
    ):
        del schedule
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling '{coupling}'; valid: {', '.join(COUPLINGS)}")
        gpath = get_path(path)
        pred = get_prediction(prediction)
        train_eps, eval_eps = sit_eps(gpath, pred)
        t_eps = train_eps if t_eps is None else float(t_eps)
        sample_eps = eval_eps if sample_eps is None else float(sample_eps)
        for name, value in (("t_eps", t_eps), ("sample_eps", sample_eps)):
            if not 0 <= value < 0.5:
                raise ValueError(
                    f"{name} must lie in [0, 0.5) (null: SiT's default for the prediction), got {value}"
                )
        self._options = dict(
            path=path,
            prediction=prediction,
            time_density=time_density,
            loc=loc,
            scale=scale,
            mode_scale=mode_scale,
            P_mean=P_mean,
            P_std=P_std,
            shift=shift,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
            t_eps=t_eps,
            sample_eps=sample_eps,
            time_scale=time_scale,
            coupling=coupling,
        )
        if loss_weighting == "default":
            loss_weighting = default_weighting(pred)
        weight(loss_weighting, pred, gpath.coefs(torch.tensor([0.5], dtype=torch.float64), torch.zeros(1, 1)))
        self.ode_t0 = max(gpath.t_min, sample_eps)
        top = min(gpath.t_max, 1.0 - sample_eps)  # the view's top and every sampler's start
        if times is None:
            if int(discrete_steps) < 2:
                raise ValueError(f"discrete_steps must be >= 2 (1000 by default), got {discrete_steps}")
            T = int(discrete_steps)
            times = (torch.arange(T, dtype=torch.float64) + 1.0) / T * top
        times = torch.as_tensor(times, dtype=torch.float64)
        a, s = gpath.alpha(times), gpath.sigma(times)
        ab = a**2 / (a**2 + s**2)
        view = Schedule(name=f"{gpath.name}[{times.numel()} steps]", betas=betas_from_alphas_cumprod(ab))
        super().__init__(view, parameterization=X0Prediction(), timestep_map=timestep_map)
        self.gpath, self.prediction, self.weighting = gpath, pred, loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.density = make_time_density(time_density, gpath, loc, scale, mode_scale, P_mean, P_std, shift)
        self.t_lo, self.t_hi = max(gpath.t_min, t_eps), min(gpath.t_max, 1.0 - t_eps)
        self.t_eps, self.sample_eps = t_eps, sample_eps
        self.time_scale, self.coupling = float(time_scale), coupling
        self.t_top = float(top)  # where sampling starts: the path's end, or before it where x0 is undefined
        self.register_buffer("times", times.to(torch.float32), persistent=False)
        self.register_buffer("times64", times, persistent=False)

    # ------------------------------------------------------------------------------ the network

    def path(self) -> GaussianPath:
        return self.gpath

    def ode_interval(self) -> tuple[float, float]:
        """[t0, t1] where the probability-flow ODE of this model is defined and the network was trained:
        [max(t_min, sample_eps), min(t_max, 1 - sample_eps)] (SiT's ``check_interval``, module docstring)."""
        return self.ode_t0, self.t_top

    def network(self, model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """P_theta(x_t, t): the network at path state x (B, C, H, W) and times t (B,)."""
        out = model_fn(x, t.to(x.dtype) * self.time_scale, y)
        pred, _ = self.split_output(out, x)
        return pred

    def predict(
        self, model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at continuous t (B,): exact, no rounding."""
        return self.prediction.x0_eps(self.network(model_fn, x, t, y), x, self.gpath.coefs(t, x))

    def velocity(self, model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """dx/dt = d_alpha x0_hat + d_sigma eps_hat at t (B,): the probability-flow ODE drift (exact)."""
        return self.prediction.to_velocity(self.network(model_fn, x, t, y), x, self.gpath.coefs(t, x))

    def denoise(self, model_fn: ModelFn, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        """D(x; sigma) in the variance-exploding view x = x_t / alpha(t), sigma = sigma(t) / alpha(t) (B,)."""
        t = self.gpath.t_from_ve_sigma(sigma.to(torch.float64)).to(x.device)
        c = self.gpath.coefs(t, x)
        x_t = c.alpha * x
        return self.prediction.to_x0(self.network(model_fn, x_t, t, y), x_t, c)

    # ------------------------------------------------------------------------------- training

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """t ~ the time density mapped affinely onto [t_lo, t_hi] = [t_eps, 1 - t_eps] within the path's
        range (SiT: t = t0 + (t1 - t0) u), (batch,) float32."""
        u = self.density.sample(batch, device, generator)
        return (self.t_lo + (self.t_hi - self.t_lo) * u).clamp(self.t_lo, self.t_hi)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor | None = None,
        eps: Tensor | None = None,
        y: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example losses (B,): ``loss`` = w(t) ||P_theta(x_t, t) - P||^2 and ``mse`` before weighting.

        Args:
            x0: (B, C, H, W) data; t: (B,) float times in [0, 1] (default: from the density);
            eps: (B, C, H, W) noise (re-paired with x0 under ``coupling=ot``); y: (B,) labels or None.
        """
        B = x0.shape[0]
        t = self.sample_timesteps(B, device=x0.device) if t is None else t
        if not t.is_floating_point():
            raise ValueError("FlowMatching.training_losses: t holds continuous times in [0, 1], not steps")
        if eps is None:
            eps = torch.randn_like(x0)
        if self.coupling == "ot":
            eps = ot_pairing(x0, eps)
        c = self.gpath.coefs(t.to(torch.float64), x0)
        x_t = (c.alpha * x0 + c.sigma * eps).to(x0.dtype)
        target = self.prediction.from_x0_eps(x0, eps, c)
        pred = self.network(model_fn, x_t, t, y)
        mse = mean_flat((pred.float() - target.float()) ** 2)
        w = weight(self.weighting, self.prediction, c, self.min_snr_gamma).reshape(B)
        return {"loss": w.float() * mse, "mse": mse}

    # ------------------------------------------------------------------------------- discrete view

    def run_model(self, model_fn: ModelFn, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x0_hat at step t of the discrete view, from x_vp = x_t / sqrt(alpha^2 + sigma^2) of the path."""
        tc = self.times64.to(x_t.device)[t.to(x_t.device)]
        c = self.gpath.coefs(tc, x_t)
        x = x_t * (c.alpha**2 + c.sigma**2).sqrt()
        return self.prediction.to_x0(self.network(model_fn, x, tc, y), x, c)

    def respace(self, use_timesteps: Iterable[int]) -> FlowMatching:
        """The discrete view over a subset of its times (every discrete sampler's ``grid`` ends here)."""
        keep = sorted(set(int(k) for k in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respace: steps must lie in [0, {self.num_timesteps - 1}], got {keep[:3]}...")
        idx = torch.tensor(keep)
        return FlowMatching(
            **self._options, times=self.times64.cpu()[idx], timestep_map=self.timestep_map.cpu()[idx]
        ).to(self.betas.device)

    # --------------------------------------------------------------------------------- likelihood

    def _no_bpd(self, *args, **kwargs):
        raise ValueError(
            "bits/dim through the variational bound is not defined for objective=flow / interpolant; "
            "evaluate sample metrics instead (e.g. fid_classifier)"
        )

    bpd_bound = _no_bpd
    bpd_estimate = _no_bpd
    vlb_terms = _no_bpd

    def extra_repr(self) -> str:
        o = self._options
        return (
            f"path={o['path']}, prediction={o['prediction']}, time_density={o['time_density']}, "
            f"shift={o['shift']}, loss_weighting={self.weighting}, t_eps={self.t_eps}, "
            f"sample_eps={self.sample_eps}, coupling={o['coupling']}, "
            f"discrete view T={self.num_timesteps}"
        )
