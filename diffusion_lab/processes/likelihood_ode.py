"""Exact log-likelihood from the probability-flow ODE, and bits/dim with uniform dequantization.

Any Gaussian path x_t = alpha(t) x_0 + sigma(t) eps (data at t = 0, noise at t = 1) has a deterministic
flow dx/dt = f(x, t) (the probability-flow ODE, Song et al. 2021, "Score-Based Generative Modeling through
SDEs", Sec. 4.3) whose marginals are those of the path. A trained model gives f, so it defines a continuous
normalizing flow from the data to the prior, and its density follows from the instantaneous change of
variables (Chen et al. 2018, Thm. 1; FFJORD, Grathwohl et al. 2019, Eq. 4; Song et al. 2021, App. D.2,
Eq. 39):

    d/dt [ x(t), l(t) ] = [ f(x(t), t), div_x f(x(t), t) ],   x(t0) = x_0,  l(t0) = 0
    log p_t0(x_0) = log p_prior(x(t1)) + l(t1)

so the negative log-likelihood is  NLL = -log p_prior(x(t1)) - integral_{t0}^{t1} div f dt  (nats).

The divergence is computed exactly (D vector-Jacobian products per evaluation: small data and tests) or by
the Hutchinson estimator (Hutchinson 1989; FFJORD Sec. 2.2) div f = E_v[v^T (df/dx) v], one
vector-Jacobian product per probe, with Rademacher or Gaussian probes v drawn once per image and held fixed
for the whole solve (so the augmented ODE is deterministic and an adaptive solver can integrate it).

How exact the numbers are:

* Hutchinson: E_v[v^T J v] = tr J, and log p_t0(x_0) is *linear* in l(t1), so with an exact solve the
  estimate of log p (and of the NLL and bits/dim) is unbiased; the estimate of the density p = exp(log p)
  is not (by Jensen it is biased upwards). Its standard deviation per image shrinks as 1/sqrt(n_probes).
  With an adaptive solver the step sizes depend on the probe through l's error estimate, a bias of the
  order of the solver tolerance.
* Solver: dopri5 with rtol = atol = 1e-5 (Song et al.'s setting) or a fixed grid (``steps``). The fixed grid
  makes the number of network evaluations the same for every batch, which distributed evaluation needs:
  adaptive solves differ per rank and a collective call then waits for ever (k-diffusion's
  ``log_likelihood`` has this failure).
* Prior: whatever ``prior_logp`` is, the result is the exact NLL of a valid model (the flow pushed back from
  that prior); :func:`gaussian_prior` gives the usual N(0, sigma(t1)^2 I) (see there for the mismatch it
  leaves on a variance-exploding path).

Bits/dim of 8-bit images (:func:`bpd_ode`): see its docstring for uniform dequantization, the bound it gives
and the "7 + ..." offset.

torchdiffeq supplies the solvers (adaptive dopri5 with error control, and the fixed-grid methods).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ODELikelihood",
    "ode_nll",
    "bpd_ode",
    "dequantize",
    "bpd_offset",
    "gaussian_prior",
    "require_flow",
    "objective_drift",
    "model_bpd_ode",
    "ode_interval",
    "FIXED_STEP_METHODS",
    "ADAPTIVE_METHODS",
]

Drift = Callable[[Tensor, Tensor], Tensor]  # f(x (B, ...), t (B,)) -> (B, ...)
LogDensity = Callable[[Tensor], Tensor]  # log p(z (B, ...)) -> (B,)

# our names -> torchdiffeq's; "heun" is Heun's second-order method (the trapezoidal predictor-corrector)
FIXED_STEP_METHODS = {"euler": "euler", "heun": "heun2", "midpoint": "midpoint", "rk4": "rk4"}
ADAPTIVE_METHODS = {
    "dopri5": "dopri5",
    "dopri8": "dopri8",
    "bosh3": "bosh3",
    "adaptive_heun": "adaptive_heun",
}
DIVERGENCES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")
DEQUANTIZATIONS = ("centered", "song")


@dataclass
class ODELikelihood:
    """Result of :func:`ode_nll`.

    nll:       (B,) -log p_t0(x_0) in nats (an estimate with Hutchinson divergences: module docstring).
    prior_nll: (B,) -log p_prior(x(t1)), the prior's share of ``nll``.
    nfe:       evaluations of the drift during the solve; each image of the batch saw all of them.
    z:         (B, ...) x(t1), the data mapped to the prior.
    """

    nll: Tensor
    prior_nll: Tensor
    nfe: int
    z: Tensor


def _probes(x: Tensor, kind: str, n: int, generator: torch.Generator | None) -> Tensor:
    """(n, B, ...) Hutchinson probes with E[v v^T] = I: Rademacher (+-1) or standard Gaussian."""
    shape = (n, *x.shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def _divergence(f: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """div_x f, (B,), from f = f(x) (B, ...) built with grad: exact (probes None) or Hutchinson's mean over
    probes of v^T (df/dx) v (FFJORD Eq. 7). A drift that does not depend on x (e.g. zero) has divergence 0."""
    if not f.requires_grad:
        return torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    if probes is None:  # exact: sum_i d f_i / d x_i, one vector-Jacobian product per dimension
        flat_f, div = f.flatten(1), torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
        for i in range(flat_f.shape[1]):
            (g,) = torch.autograd.grad(flat_f[:, i].sum(), x, retain_graph=True, allow_unused=True)
            div = div if g is None else div + g.flatten(1)[:, i]
        return div
    total = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for k, v in enumerate(probes):
        (vjp,) = torch.autograd.grad(f, x, v, retain_graph=k < len(probes) - 1, allow_unused=True)
        total = total if vjp is None else total + (vjp * v).flatten(1).sum(1)  # v^T (df/dx) v
    return total / len(probes)


def _solver(method: str, steps: int | None) -> str:
    if steps is None:
        if method not in ADAPTIVE_METHODS:
            raise ValueError(
                f"method={method!r} is a fixed-step method: give steps=N, or choose an adaptive method "
                f"from {sorted(ADAPTIVE_METHODS)}"
            )
        return ADAPTIVE_METHODS[method]
    if method not in FIXED_STEP_METHODS:
        raise ValueError(
            f"steps={steps} needs a fixed-step method from {sorted(FIXED_STEP_METHODS)}, got {method!r} "
            "(or steps=None for an adaptive solve)"
        )
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1 (or None for an adaptive solve), got {steps}")
    return FIXED_STEP_METHODS[method]


def ode_nll(
    drift: Drift,
    x0: Tensor,
    t0: float,
    t1: float,
    prior_logp: LogDensity,
    divergence: str = "hutchinson",
    probes: str = "rademacher",
    n_probes: int = 1,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    generator: torch.Generator | None = None,
) -> ODELikelihood:
    """Negative log-likelihood -log p_t0(x0) in nats by the instantaneous change of variables.

    Integrates d/dt [x, l] = [f(x, t), div f(x, t)] from t0 (the data) to t1 (the prior) and returns
    -log p_prior(x(t1)) - l(t1)  (Song et al. 2021, App. D.2, Eq. 39; FFJORD Eq. 4).

    Args:
        drift: f(x, t), the probability-flow ODE's dx/dt; x (B, ...), t (B,) in x's dtype.
        x0: (B, ...) data (float). Float64 data gives a float64 solve (the tests use it).
        t0, t1: where the data and the prior sit (t0 < t1). The drift must be finite on [t0, t1] (dopri5
            evaluates it at both ends).
        prior_logp: log p_prior(z), (B, ...) -> (B,), e.g. :func:`gaussian_prior`.
        divergence: "exact" (D vector-Jacobian products per evaluation) or "hutchinson".
        probes, n_probes: Hutchinson's probe distribution ("rademacher" or "gaussian") and count per image.
        method: adaptive ("dopri5", ...; ``steps=None``) or fixed-step ("euler", "heun", "midpoint", "rk4").
        rtol, atol: the adaptive solver's tolerances (1e-5, Song et al.).
        steps: number of uniform steps of a fixed-step method (the same work on every batch and rank).
        generator: draws the probes.
    Returns:
        :class:`ODELikelihood` with ``nll`` (B,) and ``nfe``.

    Runs with gradients enabled internally (the divergence needs them), also when called under
    ``torch.no_grad`` or ``torch.inference_mode``; the network's parameters receive no gradient. Autocast is
    off inside: the solve runs in x0's dtype (bf16's 8-bit mantissa would swamp a 1e-5 tolerance).
    """
    from torchdiffeq import odeint

    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if probes not in PROBES:
        raise ValueError(f"probes must be one of {PROBES}, got {probes!r}")
    if int(n_probes) < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a float tensor (data scaled to the model's range), got {x0.dtype}")
    if not t0 < t1:
        raise ValueError(f"need t0 < t1 (data at t0, prior at t1), got t0={t0}, t1={t1}")
    torch_method = _solver(method, steps)
    nfe = 0
    autocast_off = torch.autocast(x0.device.type, enabled=False)
    with torch.inference_mode(False), torch.enable_grad(), autocast_off:
        x0 = x0.detach().clone()  # a normal tensor, also when the caller runs in inference mode
        v = None if divergence == "exact" else _probes(x0, probes, int(n_probes), generator)
        B = x0.shape[0]

        def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            nonlocal nfe
            nfe += 1
            x = state[0].detach().requires_grad_(True)
            f = drift(x, t.to(x.dtype).expand(B)).to(x.dtype)
            if not bool(torch.isfinite(f).all()):
                raise ValueError(
                    f"bpd_ode: the drift is not finite at t = {float(t):.6g} of [{t0:g}, {t1:g}]: integrate "
                    "over the interval where the model is defined (its objective's ode_interval())"
                )
            div = _divergence(f, x, v)
            return f.detach(), div.detach()

        if steps is None:
            grid = torch.tensor([t0, t1], dtype=x0.dtype, device=x0.device)
        else:
            grid = torch.linspace(t0, t1, int(steps) + 1, dtype=x0.dtype, device=x0.device)
        l0 = torch.zeros(B, dtype=x0.dtype, device=x0.device)
        try:
            xs, ls = odeint(augmented, (x0, l0), grid, method=torch_method, rtol=rtol, atol=atol)
        except AssertionError as e:  # torchdiffeq's step-size underflow: a drift too stiff to integrate
            raise ValueError(
                f"bpd_ode: the {method} solve over [{t0:g}, {t1:g}] failed ({e}): the drift is too steep "
                "there; integrate over the objective's ode_interval() or use a fixed grid (steps=N)"
            ) from None
        z, delta = xs[-1].detach(), ls[-1].detach()
        prior = prior_logp(z).to(delta.dtype)
    return ODELikelihood(nll=-(prior + delta), prior_nll=-prior, nfe=nfe, z=z)


def gaussian_prior(sigma: float | Tensor, mean: float = 0.0) -> LogDensity:
    """log N(z; mean, sigma^2 I) summed over every dimension but the batch: (B, ...) -> (B,).

    For a path at t1 the marginal of x_t1 = alpha(t1) x_0 + sigma(t1) eps has covariance
    alpha(t1)^2 Cov(x_0) + sigma(t1)^2 I. The usual prior N(0, sigma(t1)^2 I) (Song et al. 2021) is exact
    where alpha(t1) = 0 (linear and trigonometric paths at t = 1) and leaves out alpha(t1)^2 Cov(x_0)
    elsewhere: on a variance-preserving path alpha(1) ~ 7e-3 for beta_max = 20; on a variance-exploding path
    (alpha = 1) the marginal variance is sigma_max^2 + Var(x_0), e.g. 80^2 + 0.25. The ODE NLL is exact for
    the model with this prior whatever the mismatch; the mismatch only makes that model worse, on average by
    KL(marginal || prior) = (r - log(1 + r)) / 2 per dimension with r = alpha^2 Var(x_0) / sigma^2, about
    r^2 / 4: 4e-10 nats per dimension on EDM's VE path (r = 0.25 / 80^2 = 3.9e-5) and 3e-11 on the VP-SDE
    (r = alpha(1)^2 0.25 = 1.1e-5), for data of variance 0.25.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool(sigma > 0):
        raise ValueError(f"the prior's sigma must be > 0, got {float(sigma)}")
    log_sigma = float(sigma.log())
    var = float(sigma) ** 2

    def logp(z: Tensor) -> Tensor:
        d = z.flatten(1)
        return -0.5 * ((d - mean) ** 2).sum(1) / var - d.shape[1] * (log_sigma + 0.5 * math.log(2 * math.pi))

    return logp


# ------------------------------------------------------------------------- bits/dim of 8-bit images


def bpd_offset(num_bins: int = 256, dequantization: str = "centered") -> float:
    """The "7 + ..." of bits/dim: log2 of the bin count per unit of the model's coordinate x.

    Pixel values k in {0, ..., K-1} (K = 256) are dequantized to y = k + u, u ~ U[0, 1)^D (a density on
    [0, K)^D), then mapped affinely to the model's range, x = a y + b. The change of variables gives
    p_Y(y) = p_X(x) a^D, so

        bits/dim = -log2 p_Y(y) / D = -log p_X(x) / (D ln 2) - log2(a).

    * ``"song"``: x = 2 y / K - 1 in [-1, 1) (Song et al. 2021's likelihood.py; Ho et al. 2019, Flow++),
      a = 2/256, -log2 a = log2(128) = 7: the familiar "bpd = nll / (D ln 2) + 7", which is "8 bits for the
      256 levels, minus 1 bit because [-1, 1) is twice as wide as [0, 1)".
    * ``"centered"`` (this project): the data are x = k / 127.5 - 1 (``utils.media.to_unit_range``), so a bin
      is [x_k - 1/255, x_k + 1/255), centered on the training values and the same bins as the discretized
      decoder of the discrete bound (``likelihood.discretized_gaussian_log_likelihood``); a = 2/255 and the
      offset is log2(127.5) = 7 - log2(256/255) = 6.99435.
    """
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(f"dequantization must be one of {DEQUANTIZATIONS}, got {dequantization!r}")
    width = (num_bins - 1) if dequantization == "centered" else num_bins
    return math.log2(width / 2.0)


def dequantize(
    images: Tensor,
    num_bins: int = 256,
    dequantization: str = "centered",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Integer pixels (B, C, H, W) in [0, K-1] -> x = a (k + u) + b in the model's range, u ~ U[0, 1).

    ``"centered"``: x = (k + u - 1/2) / ((K - 1) / 2) - 1, uniform on the bin of width 2/(K-1) around
    k / 127.5 - 1. ``"song"``: x = 2 (k + u) / K - 1, in [-1, 1). See :func:`bpd_offset`.
    """
    if images.is_floating_point() and not torch.equal(images, images.round()):
        raise ValueError(
            "bpd_ode takes integer pixel values (uint8 in [0, 255]), not images scaled to [-1, 1]"
        )
    if int(images.min()) < 0 or int(images.max()) > num_bins - 1:
        raise ValueError(
            f"pixel values must lie in [0, {num_bins - 1}], got [{images.min()}, {images.max()}]"
        )
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(f"dequantization must be one of {DEQUANTIZATIONS}, got {dequantization!r}")
    u = torch.rand(images.shape, generator=generator, device=images.device, dtype=dtype)
    k = images.to(dtype)
    if dequantization == "centered":
        half = (num_bins - 1) / 2.0
        return (k + u - 0.5) / half - 1.0
    return 2.0 * (k + u) / num_bins - 1.0


def bpd_ode(
    drift: Drift,
    images: Tensor,
    t0: float,
    t1: float,
    prior_logp: LogDensity,
    num_bins: int = 256,
    dequantization: str = "centered",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    **ode_options,
) -> tuple[Tensor, int]:
    """Bits/dim of 8-bit images under the flow: an UPPER BOUND on the discrete model's NLL (in expectation).

        bits/dim = -log p_X(x) / (D ln 2) + bpd_offset(),   x = dequantize(k)   (7 + ... for Song's layout)

    Uniform dequantization (Theis et al. 2016; Ho et al. 2019, Flow++ Sec. 3.1): the continuous density p_X
    defines a discrete model P(k) = integral over bin_k of p_Y, and by Jensen
    E_u[-log p_Y(k + u)] >= -log P(k), so the expectation over the dequantization noise u of this number is
    an upper bound on the discrete model's bits/dim (the variational dequantization bound with the uniform
    q(u | k)). One draw of u per image and the Hutchinson probes add zero-mean noise: averages over many
    images are unbiased estimates of that bound (up to the solver's error).

    Args:
        drift, t0, t1, prior_logp, ode_options: as :func:`ode_nll`.
        images: (B, C, H, W) integer pixel values in [0, num_bins - 1] (uint8).
        num_bins, dequantization: see :func:`bpd_offset`.
        generator: draws the dequantization noise, then the probes.
        dtype: of the solve.
        scale: the flow starts from scale * x (the state at t0 of a path with alpha(t0) = scale); the
            Jacobian D log(scale) is added back, p_X(x) = scale^D p_t0(scale x).
    Returns:
        ((B,) bits/dim per image, NFE).
    """
    x = dequantize(images, num_bins, dequantization, generator, dtype)
    out = ode_nll(drift, scale * x, t0, t1, prior_logp, generator=generator, **ode_options)
    D = x[0].numel()
    nll = out.nll - D * math.log(scale)
    return nll / (D * math.log(2.0)) + bpd_offset(num_bins, dequantization), out.nfe


# ------------------------------------------------------------------ the models' objectives (duck typing)


def require_flow(objective) -> None:
    """Raise a one-line error unless ``objective`` has ``path()`` and ``velocity(model, x, t, y)``."""
    missing = [name for name in ("path", "velocity") if not callable(getattr(objective, name, None))]
    if missing:
        raise ValueError(
            f"bpd_ode: objective {type(objective).__name__} has no probability-flow ODE (missing "
            f"{', '.join(m + '()' for m in missing)}); it needs a Gaussian path and its velocity "
            "(processes/paths.py), or use metric bpd for the discrete family's exact bound"
        )


def objective_drift(objective, model, y: Tensor | None = None) -> Drift:
    """f(x, t) = ``objective.velocity(model, x, t, y)``: the probability-flow ODE drift at continuous t."""
    require_flow(objective)

    def drift(x: Tensor, t: Tensor) -> Tensor:
        return objective.velocity(model, x, t, y)

    return drift


def ode_interval(objective) -> tuple[float, float]:
    """[t0, t1] where ``objective``'s probability-flow ODE is defined: its own ``ode_interval()`` where it has
    one (flow / interpolant models whose conversions divide by alpha or sigma at an end, SiT's
    ``check_interval``), else its path's [t_min, t_max]."""
    own = getattr(objective, "ode_interval", None)
    if callable(own):
        t0, t1 = own()
    else:
        path = objective.path()
        t0, t1 = path.t_min, path.t_max
    return float(t0), float(t1)


def model_bpd_ode(
    objective,
    model,
    images: Tensor,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    num_bins: int = 256,
    dequantization: str = "centered",
    **ode_options,
) -> tuple[Tensor, int]:
    """Bits/dim (an upper bound, see :func:`bpd_ode`) of uint8 ``images`` under a trained model.

    Integrates over the objective's :func:`ode_interval` [t0, t1] with the prior N(0, sigma(t1)^2 I). The
    prior is exact where alpha(t1) = 0 and leaves out alpha(t1)^2 Cov(x_0) elsewhere (:func:`gaussian_prior`;
    at t1 = 1 - 1e-3 on the linear path a KL of order (1e-3^2 Var(x_0))^2 per dimension). The data enter as
    the path's state at t0 in the variance-exploding view: x_t0 = alpha(t0) x with the Jacobian term
    D log alpha(t0), so the number is exactly -log of the density of x under x_0 + (sigma(t0) / alpha(t0))
    n, the model's data distribution blurred by a noise far below a bin (1e-3 against 2/255 at
    sample_eps = 1e-3; 0 where t0 = 0).

    Returns:
        ((B,) bits/dim, NFE per image).
    """
    require_flow(objective)
    path = objective.path()
    t0, t1 = ode_interval(objective)
    ends = torch.tensor([t0, t1], dtype=torch.float64)
    a0, s1 = float(path.alpha(ends)[0]), float(path.sigma(ends)[1])
    if not (a0 > 0 and s1 > 0):
        raise ValueError(
            f"bpd_ode: the ODE interval [{t0:g}, {t1:g}] of {type(objective).__name__} reaches alpha = 0 at "
            "t0 or sigma = 0 at t1; give the objective a smaller interval (objective.sample_eps)"
        )
    drift, prior = objective_drift(objective, model, y), gaussian_prior(s1)
    options = dict(num_bins=num_bins, dequantization=dequantization, generator=generator, dtype=dtype)
    return bpd_ode(drift, images, t0, t1, prior, scale=a0, **options, **ode_options)
