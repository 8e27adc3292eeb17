"""CPU speed settings: OpenMP's wait policy reaches the runtime, and the speed switches keep the math."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.models import UNet
from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.training.build import build_module, speed_up
from diffusion_lab.utils import cpu
from diffusion_lab.utils.cpu import configure_cpu

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4], num_heads=1)


def test_configure_cpu_sets_passive_wait_and_threads_but_keeps_user_values():
    env = {"KMP_BLOCKTIME": "200"}
    changed = configure_cpu(threads=3, env=env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["KMP_BLOCKTIME"] == "200"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert "KMP_BLOCKTIME" not in changed and changed["OMP_WAIT_POLICY"] == "PASSIVE"
    assert configure_cpu(env=env) == {}  # idempotent
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        configure_cpu(threads=0, env={})


def _spin_count(args: list[str]) -> str | None:
    """libgomp's GOMP_SPINCOUNT as reported when torch loads OpenMP in ``python ARGS`` (None: not libgomp)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")
    }
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    spin = [line.split("=")[1].strip(" '") for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    return spin[0] if spin else None


@pytest.mark.parametrize(
    "args, configured",
    [
        (["-m", "diffusion_lab.sample"], True),  # a command (exits 1 without ckpt=, after loading torch)
        (["-c", "import diffusion_lab, torch; torch.ones(4).sum()"], False),  # a library import
        (
            [
                "-c",
                "import diffusion_lab\ntry: diffusion_lab.load('missing.ckpt', configure_threads=True)\n"
                "except FileNotFoundError: pass\nimport torch; torch.ones(4).sum()",
            ],
            True,
        ),
    ],
    ids=["command", "import", "load-configure_threads"],
)
def test_openmp_stops_spinning_in_the_commands_not_on_import(args, configured):
    """libgomp reports its spin count: 0 (sleep at once) where the policy was set before torch loaded."""
    spin = _spin_count(args)
    if spin is None:
        pytest.skip("this torch build does not use GNU OpenMP")
    assert (spin == "0") == configured, spin


def test_channels_last_backbone_gives_the_contiguous_outputs():
    torch.manual_seed(0)
    model = UNet(1, 1, 8, **TINY).eval()
    for p in model.parameters():  # zero-initialised output layers would hide any difference
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    with torch.no_grad():
        ref = model(x, t)
        nhwc = speed_up(model, channels_last=True)
        assert nhwc.out[-1].weight.is_contiguous(memory_format=torch.channels_last)
        out = nhwc(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_bf16_mixed_training_step_is_finite_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = UNet(1, 1, 8, **TINY)
    diffusion = GaussianDiffusion(make_schedule("linear", 100), parameterization="v")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's precision="bf16-mixed" opens
        out = model(x0, torch.zeros(4, dtype=torch.long))
        loss = diffusion.training_losses(model, x0)["loss"].mean()
    assert out.dtype == torch.bfloat16  # the autocast really ran the convolutions in bf16
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _cfg(*overrides: str, out: str = "unused"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["model=unet_tiny", f"paths.output_dir={out}", *overrides])


def test_trainer_presets_carry_the_speed_settings():
    on_cpu, gpu, ddp = _cfg(), _cfg("trainer=gpu"), _cfg("trainer=ddp")
    assert on_cpu.trainer.precision == cpu.default_cpu_precision() and not on_cpu.compile
    assert not on_cpu.channels_last
    for cfg in (gpu, ddp):
        assert cfg.trainer.precision == "bf16-mixed" and cfg.compile and cfg.channels_last
        assert cfg.trainer.accelerator == "gpu"
    assert ddp.trainer.strategy == "ddp"


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_tile amx_bf16 amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (AVX2_ONLY, "32-true"),
        (ZEN4, "bf16-mixed"),
        (SAPPHIRE_RAPIDS, "bf16-mixed"),
        (GRAVITON3, "bf16-mixed"),
    ],
)
def test_cpu_precision_follows_the_bf16_units(cpuinfo, expected):
    """bf16-mixed only where oneDNN has bf16 units: without them bf16 autocast is many times slower."""
    assert cpu.default_cpu_precision(cpu.cpu_flags(cpuinfo)) == expected
    assert cpu.default_cpu_precision(frozenset()) == "32-true"
    assert cpu.cpu_flags("no flags line") is None


def test_cpu_trainer_precision_resolves_from_this_machine(monkeypatch):
    avx2 = cpu.cpu_flags(AVX2_ONLY)
    monkeypatch.setattr(cpu, "cpu_flags", lambda cpuinfo=None: avx2)
    assert _cfg().trainer.precision == "32-true"
    monkeypatch.setattr(cpu, "cpu_flags", lambda cpuinfo=None: frozenset({"avx512_bf16"}))
    assert _cfg().trainer.precision == "bf16-mixed"
    assert _cfg("trainer.precision=32-true").trainer.precision == "32-true", "an explicit choice wins"


def test_build_module_applies_the_switches_to_training_only(tmp_path):
    cfg = _cfg("channels_last=true", "compile=true", out=str(tmp_path))
    trained, _ = build_module(cfg, (1, 16, 16), 10, training=True)
    loaded, _ = build_module(cfg, (1, 16, 16), 10)
    weight = trained.model.out[-1].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert trained.model._compiled_call_impl is not None  # compiled in place: state_dict keys unchanged
    assert loaded.model._compiled_call_impl is None and loaded.model.out[-1].weight.is_contiguous()
    assert list(trained.state_dict()) == list(loaded.state_dict())


@pytest.mark.parametrize(("idle", "expected"), [(0.2, 1), (1.0, 1), (1.6, 2), (3.9, 2), (None, 2)])
def test_default_threads_counts_the_idle_cores(monkeypatch, idle, expected):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cpu, "idle_cores", lambda interval=0.3: idle)
    assert cpu.default_threads() == expected


def test_idle_cores_reads_this_machine():
    idle = cpu.idle_cores(0.05)
    if idle is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= idle <= len(os.sched_getaffinity(0)) + 1e-6
