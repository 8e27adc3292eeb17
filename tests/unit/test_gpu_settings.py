"""GPU-path settings that the CPU can check: the compile switch, the matmul precision (CPU: untouched), the
batch-size rules, and AdamW's fused step against torch's default (foreach) step."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.models.unet import UNet
from diffusion_lab.training.batch_scaling import ema_decay, ema_halflife_images, scaled_lr
from diffusion_lab.training.build import speed_up
from diffusion_lab.utils.device import COMPILE_MODES, compile_options, configure_gpu


@pytest.mark.parametrize(
    ("value", "options"),
    [
        (False, None),
        (None, None),
        ("false", None),
        (True, {}),
        ("true", {}),
        ("default", {}),
        ("reduce-overhead", {"mode": "reduce-overhead"}),
        ("max-autotune", {"mode": "max-autotune"}),
    ],
)
def test_compile_options(value, options):
    assert compile_options(value) == options


def test_compile_options_refuse_an_unknown_mode_in_one_line():
    with pytest.raises(
        ValueError, match="compile='reduce_overhead': choose false, true or a torch.compile"
    ) as e:
        compile_options("reduce_overhead")
    assert "\n" not in str(e.value) and all(m in str(e.value) for m in COMPILE_MODES)


def test_speed_up_passes_the_mode(monkeypatch):
    calls = []
    net = torch.nn.Linear(2, 2)
    monkeypatch.setattr(net, "compile", lambda **kw: calls.append(kw))
    speed_up(net, compile="reduce-overhead")
    speed_up(net, compile=True)
    speed_up(net, compile=False)
    assert calls == [{"mode": "reduce-overhead"}, {}]


def test_configure_gpu_leaves_a_cpu_run_alone():
    before = torch.get_float32_matmul_precision()
    assert configure_gpu("cpu") == {}
    assert torch.get_float32_matmul_precision() == before


def test_configure_gpu_sets_tf32_matmuls_on_cuda_unless_the_user_chose(monkeypatch):
    state = {"p": "highest"}
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: state["p"])
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: state.update(p=p))
    assert configure_gpu(torch.device("cuda", 0)) == {"float32_matmul_precision": "high"}
    assert state["p"] == "high"
    state["p"] = "medium"  # the user's choice stays
    assert configure_gpu("cuda") == {} and state["p"] == "medium"


def test_ema_half_life_in_images():
    """EDM CIFAR-10: half-life 500k images at batch 512 -> 0.5 ** (512 / 500000); DDPM's 0.9999 at batch 128
    is a half-life of 887k images, which at batch 512 is 0.99960; the two functions invert each other."""
    assert ema_decay(500_000, 512) == pytest.approx(0.5 ** (512 / 500_000), rel=1e-15)
    h = ema_halflife_images(0.9999, 128)
    assert h == pytest.approx(887_183, rel=1e-5)
    assert ema_decay(h, 128) == pytest.approx(0.9999, abs=1e-12)
    assert ema_decay(h, 512) == pytest.approx(0.99960, abs=5e-6)
    # updating every 4 steps at batch 128 is the same average as every step at 512
    assert ema_decay(h, 128, every_n_steps=4) == pytest.approx(ema_decay(h, 512), rel=1e-15)
    # after h images the weight of the first batch has halved
    assert ema_decay(h, 512) ** (h / 512) == pytest.approx(0.5, rel=1e-9)
    with pytest.raises(ValueError):
        ema_decay(0, 128)
    with pytest.raises(ValueError):
        ema_halflife_images(1.0, 128)


def test_scaled_lr():
    assert scaled_lr(2e-4, 512, 128) == pytest.approx(4e-4)
    assert scaled_lr(2e-4, 512, 128, rule="linear") == pytest.approx(8e-4)
    assert scaled_lr(1e-3, 128, 512) == pytest.approx(5e-4)
    assert math.isclose(scaled_lr(3e-4, 64, 64), 3e-4)
    with pytest.raises(ValueError, match="rule='cubic'"):
        scaled_lr(1e-3, 2, 1, rule="cubic")


def _adamw_run(fused: bool, steps: int = 10, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``steps`` AdamW steps (clipped at norm 1, weight decay on) of a tiny U-Net on fixed data."""
    torch.manual_seed(0)
    net = UNet(1, 1, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[4])
    net = net.to(dtype)
    opt = torch.optim.AdamW(
        net.parameters(), lr=1e-3, weight_decay=0.01, **({"fused": True} if fused else {"foreach": True})
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 1, 8, 8, generator=g, dtype=dtype)
        t = torch.randint(0, 1000, (4,), generator=g)
        loss = (net(x, t) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_fused_adamw_steps_as_the_foreach_one():
    """torch's fused AdamW (the CPU kernel here; CUDA has its own) against its foreach AdamW, 10 clipped
    steps.

    In fp64 the weights agree to 1e-10 (measured 6e-13) after 10 steps. In fp32 one step agrees to 1e-8
    (measured 1.2e-10); after that Adam's division by sqrt(v) magnifies the last-bit differences of elements
    whose gradient is near zero (measured 1.2e-5 after 2 steps, 2.1e-4 after 10, against 1e-2 of movement),
    which is rounding, not a different update: fp64 shows the two compute the same steps."""
    fp64 = [_adamw_run(fused, 10, torch.float64) for fused in (True, False)]
    moved = _max_gap(fp64[0], _adamw_run(True, 0, torch.float64))
    assert moved > 5e-3  # the steps did move the weights (lr 1e-3, 10 steps)
    assert _max_gap(*fp64) < 1e-10
    assert _max_gap(_adamw_run(True, 1), _adamw_run(False, 1)) < 1e-8
    assert _max_gap(_adamw_run(True, 10), _adamw_run(False, 10)) < 0.05 * moved
