"""The Python API: load a trained model and sample from it, or train one, in a few lines.

    import diffusion_lab

    pipe = diffusion_lab.load("outputs/train/runs/<run>/checkpoints/last.ckpt")   # or an exported folder
    out = pipe.sample(16, sampler="ddim", steps=50, seed=0)
    out.images        # (16, C, H, W) float32 in [-1, 1], on the CPU
    out.to_uint8()    # (16, C, H, W) uint8
    out.to_pil()      # 16 PIL images

    run_dir = diffusion_lab.train(["dataset=digits", "trainer.max_steps=500", "logger=csv"])

One code path with the commands: ``python -m diffusion_lab.sample`` loads with :func:`load` and draws with
:func:`draw`, as :meth:`Pipeline.sample` does, both choosing and checking the sampler with
:func:`~diffusion_lab.utils.checkpoint_sampler.choose_sampler` and :func:`check_sampler_config`;
``train.py`` and :func:`train` both run :func:`diffusion_lab.train.train`; ``python -m diffusion_lab.export``
writes the folder that :func:`load` reads (``config.json`` + ``model.safetensors`` + ``README.md``: nothing in
it is unpickled, nothing is fetched).

torch, Lightning and Hydra are imported on first use, not with this module, so that
``load(..., configure_threads=True)`` can still set OpenMP's environment before torch starts
(:mod:`diffusion_lab.utils.cpu`); importing it changes nothing in the host program.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from PIL import Image
    from torch import Tensor

__all__ = [
    "load",
    "train",
    "Pipeline",
    "Samples",
    "Denoiser",
    "draw",
    "check_sampler_config",
    "resolve_device",
    "compose_config",
    "FORMAT",
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CARD_FILE",
]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# The exported folder (huggingface_hub's ModelHubMixin layout): python -m diffusion_lab.export writes it.
FORMAT = "diffusion_lab"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"


# ------------------------------------------------------------------------------------------ the output


@dataclass
class Samples:
    """What :meth:`Pipeline.sample` returns.

    Attributes:
        images: (n, C, H, W) float32 in [-1, 1], on the CPU.
        labels: (n,) int64 class labels of a class-conditional model; None for an unconditional one.
        nfe: network evaluations per sample (a guided step counts once).
        sampler: the sampler and its options, in one line (``ddim: steps=50 grid=uniform ...``).
    """

    images: Tensor
    labels: Tensor | None
    nfe: int
    sampler: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def to_uint8(self) -> Tensor:
        """(n, C, H, W) uint8 in [0, 255]: round(255 (x + 1) / 2)."""
        from diffusion_lab.utils.media import to_uint8

        return to_uint8(self.images, value_range=(-1, 1))

    def to_pil(self) -> list[Image.Image]:
        """One PIL image per sample: mode ``L`` for one channel, ``RGB`` for three."""
        from PIL import Image

        pixels = self.to_uint8().permute(0, 2, 3, 1).numpy()  # (n, H, W, C)
        if pixels.shape[-1] not in (1, 3):
            raise ValueError(f"to_pil: {pixels.shape[-1]} channels; PIL images have 1 (L) or 3 (RGB)")
        if pixels.shape[-1] == 1:
            return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
        return [Image.fromarray(p, mode="RGB") for p in pixels]


# ------------------------------------------------------------------------------------------ the denoiser


class Denoiser:
    """``D(x, sigma, y=None)``: the estimate of x_0 from x = x_0 + sigma eps, the variance-exploding view in
    which every family can be written (Karras et al. 2022, "EDM", Eq. 2-3; k-diffusion's contract).

    Args of a call:
        x: (B, C, H, W) noisy images in that view (a discrete model's x_t is x / sqrt(1 + sigma^2)).
        sigma: a number or (B,) noise levels.
        y: (B,) int64 class labels, or None (unconditional; the null class of a conditional model).
    Returns:
        (B, C, H, W) denoised images. No guidance, clipping or thresholding (wrap it for those); gradients
        flow unless the caller turns them off.

    Per family:

    * EDM: the preconditioned network at any sigma, D = c_skip x + c_out F(c_in x; c_noise) (EDM Eq. 7).
    * flow matching and interpolants: the path's x_0 prediction at the t with sigma(t) / alpha(t) = sigma.
    * the discrete family (eps / x0 / v on T steps) has no continuous denoiser: D is the network's x_0
      prediction at the training step whose sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is nearest to
      sigma in log sigma (EDM App. C.3.2's ``round_sigma``), the D that the euler and heun samplers
      integrate. ``continuous`` is False there.
    """

    def __init__(self, model_fn: Callable, process: Any):
        self.model_fn, self.process = model_fn, process
        self.continuous = hasattr(process, "denoise")  # EDMDiffusion, FlowMatching

    def __call__(self, x: Tensor, sigma: float | Tensor, y: Tensor | None = None) -> Tensor:
        import torch

        from diffusion_lab.samplers.edm import sigma_denoiser

        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        if self.continuous:
            return self.process.denoise(self.model_fn, x, sigma, y)
        out = torch.empty_like(x)
        for s in sigma.unique():  # the rounded denoiser takes one noise level per call
            m = sigma == s
            D = sigma_denoiser(self.model_fn, self.process, None if y is None else y[m])
            out[m] = D(x[m], float(s))
        return out

    def __repr__(self) -> str:
        kind = "continuous" if self.continuous else "rounded to the training steps"
        return f"Denoiser({type(self.process).__name__}, {kind})"


class _CastModel:
    """The network in its own dtype (bf16, fp16, fp64) inside a float32 sampler: inputs cast to the weights'
    dtype, outputs back to the sampler's. Other attributes (``num_classes`` for the null label) are the
    network's."""

    def __init__(self, model: Any, dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model(x.to(self.dtype), t, y).to(x.dtype)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "dtype"):
            raise AttributeError(name)
        return getattr(self.model, name)


# ------------------------------------------------------------------------------------------ sampling


def resolve_device(name: Any) -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1``, a torch.device; ValueError for a device
    that is not here."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available here: use device=cpu (or auto)")
    return device


def check_sampler_config(sampler: Any, process: Any, prefix: str = "sampler.") -> None:
    """Refuse, in one line naming the key, ``steps``, ``grid`` or ``grid_opts`` that the sampler config
    ``sampler`` cannot use on ``process`` (steps outside [1, T], an unknown grid, an option it lacks)."""
    import warnings

    from diffusion_lab.samplers import resolve_steps

    steps, grid = sampler.get("steps"), sampler.get("grid") or "uniform"
    if steps is None:
        return
    opts = sampler.get("grid_opts")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resolve_steps(process, steps, grid, opts)
    except (ValueError, TypeError) as e:
        if str(e).startswith("unknown grid"):
            key, value = "grid", grid
        elif isinstance(e, TypeError):  # an option the grid does not take
            key, value = "grid_opts", dict(opts or {})
        else:
            key, value = "steps", steps
        raise ValueError(f"{prefix}{key}={value!r} is not valid: {e}") from None


def _labels_tensor(labels: Any, n: int, num_classes: int, conditional: bool) -> Tensor | int | None:
    """``labels`` of :meth:`Pipeline.sample` checked: None, a class for all, or (n,) int64 labels."""
    import torch

    if labels is None:
        return None
    if not conditional:
        raise ValueError("labels: this model is unconditional; leave labels=None")
    if isinstance(labels, int) and not isinstance(labels, bool):
        if not 0 <= labels < num_classes:
            raise ValueError(f"labels={labels} is not valid: give a class in [0, {num_classes - 1}]")
        return labels
    y = torch.as_tensor(labels).reshape(-1)
    if y.is_floating_point() or y.dtype == torch.bool or y.numel() != n:
        raise ValueError(
            f"labels: give one class (an int) or {n} integer labels, got {tuple(y.shape)} {y.dtype}"
        )
    if y.numel() and not (0 <= int(y.min()) and int(y.max()) < num_classes):
        raise ValueError(f"labels: every label must be a class in [0, {num_classes - 1}]")
    return y.long()


def draw(
    module: Any,
    sampler: Any,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 256,
    labels: int | Tensor | None = None,
    model_fn: Callable | None = None,
    device: Any = None,
    frames: list | None = None,
) -> tuple[Tensor, Tensor | None, int]:
    """Draw ``n`` samples of a :class:`~diffusion_lab.training.lit_module.DiffusionModule` in batches of
    ``batch_size``; batch i starts from the generator seeded with ``seed + i``.

    The one drawing loop of the project: :meth:`Pipeline.sample`, ``python -m diffusion_lab.sample`` and
    ``evaluate`` (through :func:`diffusion_lab.sample.generate`) all run it.

    Args:
        sampler: a sampler function or its Hydra partial (every option, classifier-free guidance included).
        labels: class-conditional models: None (sample j gets class j mod K), one class for all, or (n,)
            labels; unconditional models: None.
        model_fn: the network to call (default ``module.model``; e.g. an autoguided pair).
        device: where to sample (default: where the module's weights are).
        frames: a list that receives uint8 frames of the first batch's reverse process (16 images each).
    Returns:
        (images (n, C, H, W) float32 in [-1, 1] on the CPU, labels (n,) int64 or None, network
        evaluations per sample).
    """
    import torch

    from diffusion_lab.samplers import sample as run_sampler
    from diffusion_lab.utils.media import to_uint8
    from diffusion_lab.utils.progress import track

    model_fn = module.model if model_fn is None else model_fn
    if device is None:
        device = next(module.parameters()).device
    device = torch.device(device)
    conditional = bool(module.hparams.class_conditional)
    k = int(module.hparams.num_classes)
    outs, ys, nfe = [], [], 0
    batches = range(math.ceil(n / batch_size))  # one batch: the sampler's own step bar shows instead
    with torch.no_grad():
        for i in track(batches, f"sampling {n} images") if len(batches) > 1 else batches:
            lo, b = i * batch_size, min(batch_size, n - i * batch_size)
            y = None
            if conditional:
                if labels is None:
                    y = torch.arange(lo, lo + b, device=device) % k
                elif isinstance(labels, int):
                    y = torch.full((b,), labels, device=device)
                else:
                    y = labels[lo : lo + b].to(device)
            callback = None
            if frames is not None and i == 0:

                def callback(j, t, x_t, pred_x0):
                    frames.append(to_uint8(x_t[:16].cpu(), value_range=(-1, 1)))

            x, nfe = run_sampler(
                model_fn,
                module.diffusion,
                (b, *module.image_shape),
                sampler=sampler,
                seed=seed + i,
                device=device,
                return_nfe=True,
                y=y,
                callback=callback,
            )
            outs.append(x.float().clamp(-1, 1).cpu())
            if y is not None:
                ys.append(y.cpu())
    return torch.cat(outs), (torch.cat(ys) if conditional else None), nfe


# ------------------------------------------------------------------------------------------ the pipeline


class Pipeline:
    """A trained model, ready to sample: what :func:`load` returns.

    Attributes:
        module: the :class:`~diffusion_lab.training.lit_module.DiffusionModule` (network + process).
        config: the run config (an OmegaConf DictConfig, resolved).
        source: the checkpoint or folder it was loaded from.
        info: ``global_step`` and ``weights`` (``ema`` or ``raw``).
    """

    def __init__(self, module: Any, config: DictConfig, source: str = "", info: dict | None = None):
        self.module = module.eval()
        self.config = config
        self.source = str(source)
        self.info = dict(info or {})

    # -------------------------------------------------------------------------------- what it is

    @property
    def model(self) -> torch.nn.Module:
        """The network, ``model(x_t, t, y=None)`` (UNet, MLP or DiT): no diffusion knowledge."""
        return self.module.model

    @property
    def process(self) -> Any:
        """The objective / noise process (``GaussianDiffusion``, ``EDMDiffusion`` or ``FlowMatching``)."""
        return self.module.diffusion

    @property
    def denoiser(self) -> Denoiser:
        """``D(x, sigma, y=None)`` of this model (see :class:`Denoiser` for what it is per family)."""
        return Denoiser(self._model_fn(), self.process)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the samples."""
        return tuple(int(v) for v in self.module.image_shape)

    @property
    def class_conditional(self) -> bool:
        return bool(self.module.hparams.class_conditional)

    @property
    def num_classes(self) -> int:
        """The classes of the data (a conditional model's labels are in [0, num_classes))."""
        return int(self.module.hparams.num_classes)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The network's weights and activations (the samplers integrate in float32)."""
        return next(self.model.parameters()).dtype

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the model (``device``: auto, cpu, cuda, ...) and / or cast the network (``dtype``); returns
        self."""
        if device is not None:
            self.module.to(resolve_device(device))
        if dtype is not None:
            self.module.model.to(dtype)
        return self

    def __repr__(self) -> str:
        return (
            f"Pipeline({type(self.process).__name__}, {type(self.model).__name__}, "
            f"image_shape={self.image_shape}, class_conditional={self.class_conditional}, "
            f"device={self.device}, dtype={self.dtype}, source={self.source!r})"
        )

    def _model_fn(self) -> Callable:
        import torch

        return self.model if self.dtype == torch.float32 else _CastModel(self.model, self.dtype)

    # -------------------------------------------------------------------------------- sampling

    def sampler_config(
        self,
        sampler: str | dict | DictConfig | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        **options: Any,
    ) -> tuple[DictConfig, str]:
        """The sampler config that :meth:`sample` draws with, checked, and its one-line description.

        ``sampler``: None for the run's own (as stored with the model), a name of ``conf/sampler/``, or a
        whole config (with ``_target_``); ``steps``, ``guidance`` (``guidance_scale``) and ``options`` change
        its keys, each refused in one line where the sampler has no such option.
        """
        from omegaconf import DictConfig, OmegaConf

        from diffusion_lab.utils.checkpoint_sampler import choose_sampler, describe_sampler, sampler_name

        changes = dict(options)
        if steps is not None:
            changes["steps"] = steps
        if guidance is not None:
            changes["guidance_scale"] = float(guidance)
        if isinstance(sampler, str) or sampler is None:
            stored = self.config.get("sampler")
            if sampler is None and stored is not None and "_target_" in stored:
                base, which = stored, "the run's own sampler, " + sampler_name(stored)
            else:  # a run that stored none draws with conf/sampler/ddpm.yaml, as the sample command does
                base = _sampler_preset(sampler or "ddpm")
                which = f"the {sampler or 'ddpm'} sampler"
            unknown = [k for k in changes if k not in base]
            if unknown:
                raise ValueError(
                    f"{unknown[0]} is not an option of {which}; its options: "
                    f"{', '.join(k for k in base if not k.startswith('_'))}"
                )
            requested: Any = OmegaConf.create(changes) if sampler is None else OmegaConf.merge(base, changes)
        elif isinstance(sampler, (dict, DictConfig)):
            requested = OmegaConf.merge(OmegaConf.create(sampler), changes)
        else:
            raise ValueError(
                f"sampler={sampler!r}: give None (the run's own), a name of conf/sampler/ or a config; "
                "a sampler function goes to sample(sampler=fn)"
            )
        choice = choose_sampler(requested, self.config.get("sampler"), "ddpm", source=self.source or "model")
        check_sampler_config(choice.config, self.process, prefix="")
        return choice.config, f"{sampler_name(choice.config)}: {describe_sampler(choice.config)}"

    def sample(
        self,
        n: int = 16,
        *,
        sampler: str | dict | DictConfig | Callable | None = None,
        steps: int | None = None,
        seed: int = 0,
        labels: int | Sequence[int] | Tensor | None = None,
        guidance: float | None = None,
        batch_size: int = 256,
        **options: Any,
    ) -> Samples:
        """Draw ``n`` samples: batch i of ``batch_size`` from the generator seeded with ``seed + i``, so
        (seed, sampler, steps, batch_size, device) fix them, and ``python -m diffusion_lab.sample`` with the
        same settings writes the same images.

        Args:
            sampler: None: the run's own sampler config (as the sample command without ``sampler=``); a name
                of ``conf/sampler/`` (``ddpm``, ``ddim``, ``dpm_solver``, ``euler``, ``heun``,
                ``euler_maruyama``, ...); a config dict; or a sampler function (e.g.
                ``functools.partial(ddim_sample, eta=0.5)``), called as it is.
            steps: network evaluations (the sampler's ``steps``; None: the config's).
            seed: the first batch's seed.
            labels: class-conditional models: None cycles through the classes (sample j gets class
                j mod num_classes), an int gives every sample that class, n ints one each.
            guidance: classifier-free guidance scale (the sampler's ``guidance_scale``; 1 = none).
            **options: other keys of the sampler config (``grid="karras"``, ``eta=0.5``, ``S_churn=2``).
        Returns:
            :class:`Samples`: ``.images`` in [-1, 1], ``.to_uint8()``, ``.to_pil()``, ``.labels``, ``.nfe``.
        Raises:
            ValueError: in one line, for a count, label, sampler or option that cannot be used.
        """
        from hydra.utils import instantiate

        for key, value in (("n", n), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} is not valid: give a whole number >= 1")
        y = _labels_tensor(labels, n, self.num_classes, self.class_conditional)
        if callable(sampler) and not isinstance(sampler, str):
            kwargs = dict(options)
            if guidance is not None:
                kwargs["guidance_scale"] = float(guidance)
            if steps is not None:
                kwargs["steps"] = steps
            fn, line = _bind(sampler, kwargs), getattr(sampler, "__name__", repr(sampler))
        else:
            config, line = self.sampler_config(sampler, steps, guidance, **options)
            fn = instantiate(config)
        images, ys, nfe = draw(
            self.module, fn, n, seed=int(seed), batch_size=batch_size, labels=y, model_fn=self._model_fn()
        )
        return Samples(images, ys, nfe, line)


def _bind(fn: Callable, kwargs: dict) -> Callable:
    import functools

    return functools.partial(fn, **kwargs) if kwargs else fn


def _sampler_preset(name: str) -> DictConfig:
    """``conf/sampler/<name>.yaml`` as ``sampler=<name>`` composes it (its defaults list included)."""
    options = sorted(p.stem for p in (CONF_DIR / "sampler").glob("*.yaml"))
    if name not in options:
        raise ValueError(f"sampler={name!r} is not a sampler config: choose one of {options}")
    from diffusion_lab.utils.checkpoint_sampler import given_options

    return given_options(compose_config("sample", [f"sampler={name}"]).sampler)


# ------------------------------------------------------------------------------------------ loading


def load(
    path: str | Path,
    device: Any = "auto",
    dtype: torch.dtype | None = None,
    *,
    ema: bool = True,
    configure_threads: bool = False,
) -> Pipeline:
    """A trained model as a :class:`Pipeline`.

    Args:
        path: a checkpoint (``.ckpt``: read with ``torch.load(weights_only=True)``, tensors and plain
            containers only), a run directory (its ``checkpoints/last.ckpt``), or a folder written by
            ``python -m diffusion_lab.export`` (``config.json`` + ``model.safetensors``: nothing unpickled,
            nothing fetched).
        device: ``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1`` or a torch.device.
        dtype: the network's weights and activations (default float32; bfloat16, float16, float64); the
            samplers integrate in float32.
        ema: a checkpoint's EMA weights (where the run kept an EMA) or, False, its raw ones; an exported
            folder holds one set (its config.json ``weights``), and ``ema=False`` is refused for an EMA one.
        configure_threads: set up this process for CPU work first, as the commands do: OpenMP's waiting
            threads sleep instead of spinning (in full effect only before torch is imported; a warning says
            so otherwise) and torch uses the cores idle now (:mod:`diffusion_lab.utils.cpu`).

    Every ``_target_`` of the stored config must be one the configs under ``conf/`` name (or one admitted,
    README "Safe by default") before anything of it is built.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: in one line, for a file or folder that is not a diffusion_lab model, was altered, or
            asks to build something outside the allowed classes.
    """
    if configure_threads:
        _configure_threads()
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
            return _load_folder(path, device, dtype, ema)
        if (path / "checkpoints" / "last.ckpt").is_file():
            path = path / "checkpoints" / "last.ckpt"
        else:
            raise ValueError(
                f"{path} is neither an exported model ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a run directory "
                "(checkpoints/last.ckpt): give a checkpoint file or one of those folders"
            )
    elif not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    from diffusion_lab.training.checkpoint import load_module

    module, cfg, ckpt = load_module(path, map_location=resolve_device(device), ema=ema)
    weights = "ema" if ema and "current_model_state" in ckpt else "raw"
    pipe = Pipeline(module, cfg, str(path), {"global_step": ckpt.get("global_step"), "weights": weights})
    return pipe.to(dtype=dtype)


def _configure_threads() -> None:
    from diffusion_lab.utils.cpu import configure_cpu, default_threads

    configure_cpu()  # before torch loads (a RuntimeWarning says when it comes too late)
    import torch

    torch.set_num_threads(default_threads())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _interpolations(node: Any, key: str = "") -> list[str]:
    """Keys whose string values hold ``${``: an exported config is resolved, so none should."""
    if isinstance(node, dict):
        return [
            k for name, v in node.items() for k in _interpolations(v, f"{key}.{name}" if key else str(name))
        ]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _interpolations(v, f"{key}[{i}]")]
    return [key] if isinstance(node, str) and "${" in node else []


def read_folder_config(folder: Path) -> tuple[dict, DictConfig, tuple[int, int, int], int]:
    """(config.json, the run config checked, image_shape, num_classes) of an exported folder; every check
    that needs nothing built: the format, the shapes, the config's targets and its agreement with
    image_shape. One-line ValueErrors."""
    from omegaconf import OmegaConf

    from diffusion_lab.utils.safe_config import check_stored_config, upgrade_targets

    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{folder} is not an exported model: no {CONFIG_FILE}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({_first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f'{path} was not written by diffusion_lab\'s export (no "format": "{FORMAT}")')
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {meta.get('format_version')!r} is not one this diffusion_lab reads "
            f"({FORMAT_VERSION}); export the checkpoint again with this version"
        )
    shape = meta.get("image_shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    ):
        raise ValueError(f"{path}: image_shape={shape!r} is not valid: [channels, height, width], each >= 1")
    k = meta.get("num_classes")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"{path}: num_classes={k!r} is not valid: a whole number >= 0")
    config = meta.get("config")
    if not isinstance(config, dict) or not config:
        raise ValueError(f'{path} holds no run config (its "config")')
    where = _interpolations(config)
    if where:
        raise ValueError(f"{path}: config.{where[0]} holds an interpolation; an exported config is resolved")
    try:
        cfg = OmegaConf.create(upgrade_targets(config))
    except Exception as e:
        raise ValueError(f"{path}: its config is not valid ({_first_line(e)})") from None
    check_stored_config(cfg, source=f"exported model {folder}")
    data = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    c, size = data.get("channels"), data.get("image_size")
    if c is not None and size is not None and [c, size, size] != shape:
        raise ValueError(
            f"{path}: image_shape={shape} disagrees with its config (dataset.channels={c}, "
            f"dataset.image_size={size}): the folder was altered; export the checkpoint again"
        )
    return meta, cfg, (shape[0], shape[1], shape[2]), k


def _load_folder(folder: Path, device: Any, dtype: torch.dtype | None, ema: bool) -> Pipeline:
    """An exported folder (see :mod:`diffusion_lab.export`): config checked first, weights read with
    safetensors (no pickle), the module built from the config and loaded strictly."""
    meta, cfg, image_shape, num_classes = read_folder_config(folder)
    weights = meta.get("weights", "ema")
    if not ema and weights == "ema":
        raise ValueError(f"{folder} holds only its EMA weights; export the raw ones with ema=false")
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{folder} is not an exported model: no {WEIGHTS_FILE}")
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # the header only
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None

    from diffusion_lab.training.build import build_module

    try:
        module, _ = build_module(cfg, image_shape, num_classes)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(
            f"exported model {folder}: its config does not build a model ({_first_line(e)})"
        ) from None
    wanted = {key: tuple(v.shape) for key, v in module.state_dict().items()}
    for key in sorted(set(wanted) | set(stored)):
        if key not in stored:
            raise ValueError(f"{path} does not fit its config: {key} is missing")
        if key not in wanted:
            raise ValueError(f"{path} does not fit its config: {key} is not a weight of the model")
        if stored[key] != wanted[key]:
            raise ValueError(
                f"{path} does not fit its config: {key} has shape {list(stored[key])}, the model's "
                f"{list(wanted[key])}"
            )
    try:
        module.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except Exception as e:
        raise ValueError(f"{path} does not fit its config ({_first_line(e)})") from None
    module.to(resolve_device(device))
    info = {"global_step": meta.get("global_step"), "weights": weights}
    return Pipeline(module, cfg, str(folder), info).to(dtype=dtype)


# ------------------------------------------------------------------------------------------ training


def compose_config(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False):
    """``conf/<config_name>.yaml`` composed with ``overrides`` through Hydra's compose API (the
    ``${cpu_precision:}`` resolver registered first). Hydra's global state is left as it was, so this also
    works inside a ``@hydra.main`` program."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffusion_lab.utils.cpu import register_resolvers

    register_resolvers()
    gh = GlobalHydra.instance()
    previous = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        if previous is not None:
            gh.clear()
            gh.initialize(previous)


def train(
    overrides: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    configure_threads: bool = False,
) -> Path:
    """Train as ``python train.py OVERRIDES`` does; returns the run directory.

    Args:
        overrides: Hydra overrides, exactly as on the command line (``["dataset=digits", "objective=edm",
            "trainer.max_steps=500"]``).
        run_dir: where the run writes (default: the config's ``hydra.run.dir``,
            ``outputs/<task_name>/runs/<time>`` under the current directory).
        configure_threads: OpenMP's environment first (see :func:`load`); torch's thread count follows the
            config's ``threads`` either way (null: the cores idle at start).

    The run directory gets what a command-line run writes: ``checkpoints/``, the loggers' files,
    ``result.yaml`` (final metrics and checkpoint paths) and ``.hydra/config.yaml`` + ``overrides.yaml``.
    A multirun (``-m``, sweeps) is the command line's.
    """
    if configure_threads:
        from diffusion_lab.utils.cpu import configure_cpu

        configure_cpu()
    overrides = [str(o) for o in ([overrides] if isinstance(overrides, str) else overrides)]
    from omegaconf import OmegaConf, open_dict

    from diffusion_lab.train import train as run

    cfg = compose_config("config", overrides, return_hydra_config=True)
    out = Path(run_dir if run_dir is not None else cfg.hydra.run.dir).resolve()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        del cfg["hydra"]
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), out / ".hydra" / "overrides.yaml")
    run(cfg)
    return out
