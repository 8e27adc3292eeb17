"""What the benchmarks run: the project's own backbones (from ``conf/model``), the training step as Lightning
runs it (``precision="bf16-mixed"`` is ``torch.autocast("cpu", torch.bfloat16)`` around the forward pass and
loss only), and FLOP counts from ``torch.utils.flop_counter``."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from diffusion_lab.models import UNet
from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule

__all__ = [
    "TrainSetup",
    "build_unet",
    "build_backbone",
    "make_diffusion",
    "flops_per_image",
    "train_step",
    "autocast",
]

CONF = Path(__file__).resolve().parents[2] / "conf"


def build_unet(name: str, image_size: int, channels: int = 1) -> UNet:
    """The backbone of ``conf/model/<name>.yaml`` for ``channels``-channel images of ``image_size``."""
    kw = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    kw.pop("_target_")
    return UNet(in_channels=channels, out_channels=channels, image_size=image_size, **kw)


def build_backbone(
    name: str, image_size: int, channels: int = 1, num_classes: int | None = None
) -> nn.Module:
    """Any backbone of ``conf/model/<name>.yaml`` (U-Net, DiT, MLP), built as ``train.py`` builds it."""
    return instantiate(
        OmegaConf.load(CONF / "model" / f"{name}.yaml"),
        in_channels=channels,
        out_channels=channels,
        image_size=image_size,
        num_classes=num_classes,
    )


def make_diffusion(schedule: str = "sigmoid", objective: str = "v") -> GaussianDiffusion:
    return GaussianDiffusion(make_schedule(schedule, 1000), parameterization=objective)


def autocast(bf16: bool):
    """Lightning's ``bf16-mixed`` on the CPU (its ``MixedPrecision`` plugin opens exactly this context)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the GPU attention kernels but not the CPU one that F.scaled_dot_product_attention
# dispatches to here (torch 2.x): without these, attention (QK^T and AV) would count as free.
SDPA_CPU_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def flops_per_image(model: nn.Module, shape: tuple[int, int, int], backward: bool = True, call=None) -> float:
    """FLOPs of one image through ``model`` (forward, + backward), counted by ``FlopCounterMode``.

    ``call(model, x)`` runs the model (default ``model(x, t)`` with random timesteps); batch 2, divided. A
    multiply-add counts as two FLOPs; attention's QK^T and AV are counted (``SDPA_CPU_FLOPS``).
    """
    model = copy.deepcopy(model)
    x = torch.randn(2, *shape)
    call = call or (lambda m, x: m(x, torch.randint(0, 1000, (x.shape[0],))))
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        if backward:
            call(model, x).float().sum().backward()
        else:
            with torch.no_grad():
                call(model, x)
    return counter.get_total_flops() / 2


@dataclass
class TrainSetup:
    """One way of running the training step (the switches of ``conf/trainer`` and ``conf/config.yaml``)."""

    bf16: bool = False  # trainer.precision: bf16-mixed (else 32-true)
    channels_last: bool = False  # channels_last=true
    compile: bool = False  # compile=true (torch.compile, inductor)
    fused: bool | None = None  # optimizer.fused (None: torch's default, the foreach implementation)
    batch: int = 128
    threads: int = 1

    def label(self) -> str:
        parts = ["bf16-mixed" if self.bf16 else "fp32"]
        parts += ["channels_last"] * self.channels_last + ["compile"] * self.compile
        parts += [] if self.fused is None else ["fused AdamW" if self.fused else "for-loop AdamW"]
        return " + ".join(parts) + f", batch {self.batch}, {self.threads} thread" + "s" * (self.threads > 1)


def train_step(model_name: str, image_size: int, setup: TrainSetup, seed: int = 0):
    """A closure running one optimizer step of ``model_name`` on a fixed batch (returns the batch size),
    and the seconds its first two steps took (``torch.compile`` compiles in the first)."""
    torch.manual_seed(seed)
    model = build_backbone(model_name, image_size)
    diffusion = make_diffusion()
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_kw = {} if setup.fused is None else {"fused": setup.fused}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **opt_kw)
    if setup.compile:
        model.compile()
    x0 = torch.rand(setup.batch, 1, image_size, image_size) * 2 - 1

    def step() -> int:
        with autocast(setup.bf16):
            loss = diffusion.training_losses(model, x0)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return setup.batch

    torch.set_num_threads(setup.threads)
    start = time.perf_counter()
    step()
    step()
    return step, time.perf_counter() - start
