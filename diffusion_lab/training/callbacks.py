"""Training callbacks: EMA of the weights, sample grids and denoising animations, sample quality (FID)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from diffusion_lab.utils.media import save_animation, save_grid, to_uint8

log = logging.getLogger(__name__)

__all__ = [
    "EMA",
    "SamplingCallback",
    "SampleGrid",
    "SampleQuality",
    "FinalLastCheckpoint",
    "ema_module",
    "run_dir",
]


# ----------------------------------------------------------------------------------------------- EMA


def _ema_update(decay: float, warmup: bool):
    """multi_avg_fn for :class:`~torch.optim.swa_utils.AveragedModel`: ema <- d ema + (1 - d) theta.

    With warm-up the decay of the n-th update is min(decay, (1 + n) / (10 + n)), so that early averages are
    not dominated by the random initialisation. ``num_averaged`` is the number of updates so far: a Python int
    from the :class:`EMA` callback (no host wait), or AveragedModel's tensor.
    """

    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: int | Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - d)
        for e, p in zip(ema_params, params):  # integer buffers (step maps, counters) are copied
            if not e.is_floating_point():
                e.copy_(p)

    return update


class EMA(WeightAveraging):
    """Exponential moving average of the weights through Lightning's :class:`WeightAveraging`.

    The averaged weights are swapped in during validation, written as the checkpoint's ``state_dict``
    (the raw weights go to ``current_model_state``) and copied into the model when training ends; use
    :func:`ema_module` to sample from them at any other time.

    The update is :class:`~torch.optim.swa_utils.AveragedModel`'s, with the update count kept in Python:
    AveragedModel reads its ``n_averaged`` tensor back on the host at every update (a host wait per step).
    The tensor is still counted on the device, for the checkpoints.
    """

    def __init__(
        self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1, **kwargs: Any
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self._avg_update = _ema_update(decay, warmup)
        super().__init__(multi_avg_fn=self._avg_update, **kwargs)
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self._num_averaged = 0  # == self._average_model.n_averaged, on the host

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._num_averaged = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._latest_update_step and self.should_update(
            step_idx=trainer.global_step - 1
        ):
            self._update_average(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def _update_average(self, pl_module: pl.LightningModule) -> None:
        """``AveragedModel.update_parameters(pl_module)`` with the count from the host."""
        average = self._average_model
        assert average is not None
        if self._use_buffers:
            ema = itertools.chain(average.module.parameters(), average.module.buffers())
            current = itertools.chain(pl_module.parameters(), pl_module.buffers())
        else:
            ema, current = average.module.parameters(), pl_module.parameters()
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for e, p in zip(ema, current):
            es, ps = groups.setdefault((e.device, e.dtype), ([], []))
            es.append(e.detach())
            ps.append(p.detach().to(e.device))
        for es, ps in groups.values():
            if self._num_averaged == 0:  # the first update copies
                torch._foreach_copy_(es, ps)
            else:
                self._avg_update(es, ps, self._num_averaged)
        average.n_averaged.add_(1)
        self._num_averaged += 1

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:
            self._num_averaged = int(self._average_model.n_averaged)  # once, when the run resumes

    @property
    def averaged(self) -> pl.LightningModule | None:
        return None if self._average_model is None else self._average_model.module


def ema_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> pl.LightningModule:
    """The EMA copy of the module when an :class:`EMA` callback runs, else the module itself."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA) and cb.averaged is not None:
            return cb.averaged
    return pl_module


class FinalLastCheckpoint(pl.Callback):
    """Write ``last.ckpt`` when training ends at a step that the periodic saves did not reach.

    It runs before the EMA callback's ``on_train_end`` (which copies the averages into the model), so the
    checkpoint keeps the raw weights beside the EMA ones and a resumed run continues exactly.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                if getattr(cb, "_last_global_step_saved", -1) != trainer.global_step:
                    path = cb.last_model_path or str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}.ckpt")
                    trainer.save_checkpoint(path, weights_only=False)  # the full state: it resumes
                    cb.last_model_path = path
                    cb._last_checkpoint_saved = path
                    cb._last_global_step_saved = trainer.global_step


def run_dir(trainer: pl.Trainer) -> Path:
    return Path(trainer.default_root_dir)


# --------------------------------------------------------------------- sampling during training


class SamplingCallback(pl.Callback):
    """What :class:`SampleGrid` and :class:`SampleQuality` share: when they run and how they draw samples.

    They run every ``every_n_steps`` optimizer steps (0: not during training) and once more when training ends
    (``run_at_end_always``: even when the last step just ran). :meth:`draw` samples from the EMA weights (the
    module itself without an EMA callback) in eval mode with ``sampler``, by default the run's sampler (the
    module's ``sampler``, built from the ``sampler=`` config). Under DDP each rank draws its share of the
    samples with a generator seeded ``seed + rank``, and the shares are gathered on every rank.

    Args:
        every_n_steps: period in optimizer steps; 0 = only at the end of training.
        sampler: ``sampler(model_fn, diffusion, x_T, *, generator, y, callback)`` (a ``_partial_`` sampler
            config), or None for the run's sampler.
        seed: base seed of the drawn samples (the same every time, so successive draws are comparable).
    """

    run_at_end_always = False

    def __init__(self, every_n_steps: int, sampler: Callable[..., Tensor] | None, seed: int):
        if sampler is not None and not callable(sampler):
            raise ValueError(
                f"{type(self).__name__}: sampler must be a sampler config "
                f"(e.g. +sampler@metrics.sampler=ddim) or null for the run's sampler, got {sampler!r}"
            )
        self.every_n_steps = every_n_steps
        self.sampler = sampler
        self.seed = seed
        self._last_step = -1

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> Any:
        """Draw and use the samples; ``tag`` is ``step<k>`` or ``final``."""
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.run(trainer, pl_module, tag=f"step{step:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.run_at_end_always or trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.run(trainer, pl_module, tag="final")

    @torch.no_grad()
    def draw(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        n: int,
        batch_size: int | None = None,
        callback: Callable[..., Any] | None = None,
    ) -> Tensor:
        """``n`` samples (n, C, H, W) in [-1, 1] on the module's device, the same on every rank.

        Each rank draws ceil(n / world) of them in batches of ``batch_size`` (all at once by default) from one
        generator seeded ``seed + rank``; class-conditional models get the labels 0, 1, ..., K-1, 0, ...
        ``callback`` (the samplers' per-step callback) sees the first batch of rank zero only.
        """
        module = ema_module(trainer, pl_module)
        sampler = self.sampler or getattr(module, "sampler", None)
        if sampler is None:
            raise ValueError(
                f"{type(self).__name__}: the module has no sampler; set sampler= in the run config"
            )
        world, rank, device = trainer.world_size, trainer.global_rank, pl_module.device
        share = math.ceil(n / world)
        batch_size = batch_size or share
        g = torch.Generator(device=device).manual_seed(self.seed + rank)
        was_training = module.training
        module.eval()
        parts = []
        try:
            for start in range(0, share, batch_size):
                b = min(batch_size, share - start)
                x_T = torch.randn((b, *module.image_shape), generator=g, device=device)
                y = None
                if module.hparams.class_conditional:
                    y = (torch.arange(b, device=device) + start) % module.hparams.num_classes
                first = start == 0 and rank == 0
                parts.append(
                    sampler(
                        module.model,
                        module.diffusion,
                        x_T,
                        generator=g,
                        y=y,
                        callback=callback if first else None,
                    )
                )
        finally:
            if was_training:
                module.train()
        samples = torch.cat(parts)
        if world > 1:
            samples = pl_module.all_gather(samples).flatten(0, 1)
        return samples[:n]


def sampler_name(sampler: Any) -> str:
    """A short description of a sampler partial for logs, e.g. ``ddim_sample(steps=50)``."""
    func = getattr(sampler, "func", sampler)
    steps = getattr(sampler, "keywords", {}).get("steps")
    return f"{getattr(func, '__name__', type(func).__name__)}(steps={steps})"


class SampleGrid(SamplingCallback):
    """Every ``every_n_steps`` optimizer steps and at the end of training: draw ``num_samples`` images from
    the EMA weights with the run's sampler (or ``sampler``), save a PNG grid under ``samples/`` of the run
    directory and, with ``animation``, a GIF of the reverse process under ``animations/``; log both to the
    loggers that take images (wandb, TensorBoard).

    Under DDP each rank draws its share (seed + rank) and rank zero gathers and writes.
    """

    run_at_end_always = True  # the final grid is always written (samples/final.png)

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        sampler: Any = None,
        animation: bool = True,
        animation_frames: int = 40,
        seed: int = 1234,
    ):
        super().__init__(every_n_steps, sampler, seed)
        self.num_samples = num_samples
        self.animation = animation
        self.animation_frames = animation_frames

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> Tensor:
        frames: list[Tensor] = []

        def callback(i: int, t: Tensor, x_t: Tensor, pred_x0: Tensor) -> None:
            frames.append(x_t[:16].detach().float().cpu())

        samples = self.draw(
            trainer, pl_module, self.num_samples, callback=callback if self.animation else None
        )
        self._write(trainer, samples, frames, tag)
        return samples

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, samples: Tensor, frames: list[Tensor], tag: str) -> None:
        out = run_dir(trainer)
        grid_path = save_grid(to_uint8(samples.cpu(), value_range=(-1, 1)), out / "samples" / f"{tag}.png")
        gif_path = None
        if frames:
            idx = torch.linspace(0, len(frames) - 1, min(self.animation_frames, len(frames))).round().long()
            chosen = [to_uint8(frames[i], value_range=(-1, 1)) for i in idx.tolist()]
            gif_path = save_animation(chosen, out / "animations" / f"{tag}.gif")
        log.info("samples written to %s", grid_path)
        log_media(trainer, grid_path, gif_path)


def log_media(trainer: pl.Trainer, grid_path: Path, gif_path: Path | None) -> None:
    """Send a grid (and animation) to every logger that takes media; a logger failure only warns."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    step = trainer.global_step
    for logger in trainer.loggers:
        try:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_image(key="samples", images=[str(grid_path)], step=step)
                if gif_path is not None:
                    logger.experiment.log(
                        {"animation": wandb.Video(str(gif_path), format="gif"), "trainer/global_step": step}
                    )
            elif isinstance(logger, TensorBoardLogger):
                import numpy as np
                from PIL import Image

                img = np.asarray(Image.open(grid_path).convert("RGB"))
                logger.experiment.add_image("samples", img, step, dataformats="HWC")
        except Exception as e:  # media logging must never stop training
            log.warning("could not log samples to %s: %s", type(logger).__name__, e)


# ---------------------------------------------------------------------------------- sample quality


class SampleQuality(SamplingCallback):
    """Every ``every_n_steps`` steps (and at the end): draw ``n`` samples from the EMA weights with the run's
    sampler (the ``sampler=`` config; ``sampler`` overrides it), score them with a
    :class:`~diffusion_lab.metrics.MetricSuite` on the module's device against the data module's real
    ``real_split`` and log ``val/<metric>``, ``best/<metric>`` (lowest FID/KID, highest IS so far), the
    sample count and the seconds the evaluation took; the class histogram goes to wandb as a bar chart.

    Under DDP each rank draws n / world samples (seed + rank); rank zero gathers them, computes the metrics
    and broadcasts the values, so every rank logs the same numbers.
    """

    def __init__(
        self,
        metrics_cfg: Any,
        every_n_steps: int = 5000,
        n: int = 1000,
        sampler: Callable[..., Tensor] | None = None,
        real_split: str = "test",
        n_real: int | None = None,
        sample_batch_size: int = 250,
        seed: int = 4321,
    ):
        from diffusion_lab.metrics import MetricSuite

        super().__init__(every_n_steps, sampler, seed)
        self.suite = MetricSuite.from_config(metrics_cfg)
        self.n, self.real_split, self.n_real = n, real_split, n_real
        self.sample_batch_size = sample_batch_size
        self.best: dict[str, float] = {}

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> dict[str, float]:
        return self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        import time

        start = time.perf_counter()
        samples = self.draw(trainer, pl_module, self.n, batch_size=self.sample_batch_size)
        fake = to_uint8(samples, value_range=(-1, 1)).cpu()
        values: dict[str, float] = {}
        histogram = None
        if trainer.is_global_zero:
            dm = trainer.datamodule
            key = dm.real_stats_key(self.real_split, self.n_real)
            self.suite.to(pl_module.device)  # the feature extractors run where the model trains
            results = self.suite.compute(
                fake, real=lambda: dm.real_images(self.real_split, self.n_real)[0], cache_key=key
            )
            histogram = results.pop("class_histogram", None)
            values = {k: float(v) for k, v in results.items()}
        values = trainer.strategy.broadcast(values, src=0)
        seconds = time.perf_counter() - start
        logged: dict[str, float] = {f"val/{k}": v for k, v in values.items()}
        for name, value in values.items():
            lower_better = name.startswith(("fid_", "kid_"))
            if name.startswith(("fid_", "kid_", "is_")) and not name.endswith("_std"):
                old = self.best.get(name)
                if old is None or (value < old if lower_better else value > old):
                    self.best[name] = value
                logged[f"best/{name}"] = self.best[name]
        logged["val/metric_samples"] = float(len(fake))
        logged["val/metric_seconds"] = seconds
        # Straight to the loggers (self.log would hold step values back until the next logging step, and is
        # not allowed in on_train_end) and into the callback metrics that ModelCheckpoint monitors.
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        if trainer.is_global_zero:
            log.info(
                "step %d: %s (%d samples, %s, %.1f s)",
                trainer.global_step,
                ", ".join(f"{k}={v:.4g}" for k, v in values.items()),
                len(fake),
                sampler_name(self.sampler or ema_module(trainer, pl_module).sampler),
                seconds,
            )
            if histogram is not None:
                _log_histogram(trainer, histogram)
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))


def _log_histogram(trainer: pl.Trainer, histogram: Tensor) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            try:
                import wandb

                table = wandb.Table(
                    data=[[str(i), int(c)] for i, c in enumerate(histogram.tolist())],
                    columns=["class", "count"],
                )
                logger.experiment.log(
                    {
                        "val/class_histogram": wandb.plot.bar(
                            table, "class", "count", title="classes of samples"
                        ),
                        "trainer/global_step": trainer.global_step,
                    }
                )
            except Exception as e:  # never stop training for a chart
                log.warning("could not log the class histogram to wandb: %s", e)
