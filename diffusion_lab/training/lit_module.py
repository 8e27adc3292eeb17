"""The thin LightningModule: a backbone, a :class:`~diffusion_lab.processes.diffusion.GaussianDiffusion`,
an optimizer.

All diffusion math lives in ``diffusion.py``; sampling grids, animations and FID live in callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn

from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.likelihood_ode import model_bpd_ode
from diffusion_lab.training.host_sync import is_log_step
from diffusion_lab.training.optim import build_optimizer, fused_by_default
from diffusion_lab.utils.media import to_uint8

__all__ = ["DiffusionModule", "images_in_batch"]


def images_in_batch(batch: tuple[Tensor, Tensor]) -> int:
    """B of an (x0 (B, C, H, W), y (B,)) batch: the ``batch_size_fn`` of the throughput callback."""
    return batch[0].shape[0]


class DiffusionModule(pl.LightningModule):
    """Train ``model`` to denoise under ``diffusion``.

    Throughput (images/s) is logged by :class:`~diffusion_lab.training.throughput.ImagesPerSecond`
    (``conf/callbacks``). The training step never waits for the device outside logging steps
    (:mod:`diffusion_lab.training.host_sync`): the gradient norm comes from the clipping call and is logged at
    logging steps only, and the optimizer is torch's fused one where it has one (its step can skip itself on
    the device for the non-finite guard, :mod:`diffusion_lab.training.guards`).

    Args:
        model: backbone, ``forward(x, t, y=None)``.
        diffusion: the schedule + objective.
        optimizer: ``params -> Optimizer`` (a ``_partial_`` config).
        lr_scheduler: ``optimizer -> LRScheduler`` stepped every optimizer step, or None.
        sampler: the default sampler, ``sampler(model_fn, diffusion, x_T, ...)`` (a ``_partial_`` config).
        image_shape: (C, H, W) of the data.
        num_classes: classes of the data; labels are fed to the model only when ``class_conditional``.
        cond_drop_prob: probability of replacing a label by the null class (classifier-free guidance).
        seed: base seed of the per-step noise (t and eps are a function of seed, step and rank, so a resumed
            run draws exactly the noise the uninterrupted run would have drawn).
        val_bpd_ode_images, val_bpd_ode_steps: objectives without the discrete bound (no ``val/bpd``) but
            with a probability-flow ODE (``velocity``) log ``val/bpd_ode`` on this many images of the first
            validation batch, Heun on this many fixed steps (the same work on every rank); 0 images: off.
        config: the resolved run config, saved in checkpoints so that commands can rebuild the module.
    """

    flops_per_batch: int | None = None  # read by the throughput callback: unknown, so no FLOP/s or MFU

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        sampler: Callable[..., Tensor] | None = None,
        image_shape: tuple[int, int, int] = (1, 16, 16),
        num_classes: int = 10,
        class_conditional: bool = False,
        cond_drop_prob: float = 0.1,
        seed: int = 0,
        val_bpd_ode_images: int = 8,
        val_bpd_ode_steps: int = 8,
        config: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "diffusion", "optimizer", "lr_scheduler", "sampler"])
        self.model = model
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.sampler = sampler
        self.image_shape = tuple(image_shape)

    # --------------------------------------------------------------------------------------- network

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model(x, t, y if self.hparams.class_conditional else None)

    def _labels(self, y: Tensor, drop: bool, generator: torch.Generator | None = None) -> Tensor | None:
        """Labels for the model: None when unconditional; during training some become the null class."""
        if not self.hparams.class_conditional:
            return None
        if drop and self.hparams.cond_drop_prob > 0:
            u = torch.rand(y.shape, generator=generator, device=y.device)
            y = torch.where(u < self.hparams.cond_drop_prob, torch.full_like(y, self.hparams.num_classes), y)
        return y

    def _step_generator(self, stream: int) -> torch.Generator:
        """A generator seeded by (seed, global step, rank, stream): the noise of step k is fixed."""
        g = torch.Generator(device=self.device)
        key = (self.hparams.seed * 1_000_003 + self.global_step) * 1009 + self.global_rank * 31 + stream
        g.manual_seed(key % (2**63 - 1))
        return g

    # -------------------------------------------------------------------------------------- training

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, y = batch  # (B, C, H, W) in [-1, 1], (B,)
        g = self._step_generator(stream=0)
        t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device, generator=g)
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        terms = self.diffusion.training_losses(self.model, x0, t=t, eps=eps, y=self._labels(y, True, g))
        loss = terms["loss"].mean()
        self.log("train/loss", loss)  # no prog_bar: StepProgressBar reads it at logging steps only
        for key in ("mse", "vlb"):
            if key in terms:
                self.log(f"train/{key}", terms[key].mean())
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as ``trainer.gradient_clip_val`` / ``gradient_clip_algorithm`` say, and log the total L2 norm
        of the gradients before clipping as ``train/grad_norm`` at logging steps.

        Clipping by norm is torch's ``clip_grad_norm_``, whose total norm is the logged one: no second pass,
        and no host wait (the norm is read only when Lightning writes the logs).
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        total = None
        if gradient_clip_val and gradient_clip_val > 0:
            if gradient_clip_algorithm in (None, GradClipAlgorithmType.NORM):
                params = [p for group in optimizer.param_groups for p in group["params"]]
                total = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if grads and is_log_step(self.trainer):
            if total is None:  # no clipping by norm (or by value: the norm after clipping)
                total = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", total)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, y = batch
        g = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)  # same noise at every check
        t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device, generator=g)
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        labels = self._labels(y, False)
        terms = self.diffusion.training_losses(self.model, x0, t=t, eps=eps, y=labels)
        self.log("val/loss", terms["loss"].mean(), prog_bar=True, sync_dist=True)
        if getattr(self.diffusion, "has_likelihood", True) and hasattr(self.diffusion, "bpd_estimate"):
            bpd = self.diffusion.bpd_estimate(self.model, x0, y=labels, generator=g)
            self.log("val/bpd", bpd.mean(), sync_dist=True)
        elif (
            batch_idx == 0
            and self.hparams.val_bpd_ode_images > 0
            and callable(getattr(self.diffusion, "velocity", None))
        ):
            self.log("val/bpd_ode", self.bpd_ode(x0, labels), sync_dist=True)

    def bpd_ode(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        """Mean bits/dim from the probability-flow ODE (a dequantized upper bound, likelihood_ode.py)
        of the first ``val_bpd_ode_images`` of ``x0`` (B, C, H, W) in [-1, 1]: Heun on a fixed grid, one
        Rademacher probe, the same dequantization and probes at every check."""
        n = self.hparams.val_bpd_ode_images
        images = to_uint8(x0[:n], value_range=(-1.0, 1.0))
        g = torch.Generator(device=self.device).manual_seed(20_000)
        y = labels[:n] if labels is not None else None
        bpd, _ = model_bpd_ode(
            self.diffusion, self.model, images, y, g, method="heun", steps=self.hparams.val_bpd_ode_steps
        )
        return bpd.mean()

    # ------------------------------------------------------------------------------------ optimizers

    def _fused_optimizer(self) -> bool:
        """Torch's fused optimizer step (:func:`~diffusion_lab.training.optim.fused_by_default`), except under
        fp16 mixed precision, whose gradient scaler would clip still-scaled gradients."""
        trainer = self._trainer
        if trainer is None:
            return fused_by_default(self.optimizer_factory, self.device.type)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler is None and fused_by_default(self.optimizer_factory, trainer.strategy.root_device.type)

    def configure_optimizers(self):
        optimizer = build_optimizer(
            self.optimizer_factory, self.model.parameters(), fused=self._fused_optimizer()
        )
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------ checkpoint state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
        # The optimizer steps as this run builds it, not as the checkpoint's run did: torch's load_state_dict
        # takes the saved groups' fused / foreach switches (and places the step counts by them).
        if self._fused_optimizer():
            for state in checkpoint.get("optimizer_states", []):
                for group in state.get("param_groups", []):
                    group["fused"], group["foreach"] = True, None
