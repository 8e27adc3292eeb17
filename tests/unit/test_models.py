"""Backbones: shapes, conditioning, zero-init, attention against a naive reference, configs, sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.models import MLP, UNet, count_parameters, timestep_embedding
from diffusion_lab.models.unet import AttentionBlock, attention_levels, group_norm

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
TINY = dict(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two and immune to a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised layers stop hiding the rest of the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------ time embedding


@pytest.mark.parametrize("dim", [1, 2, 7, 16, 33])
def test_timestep_embedding_shape_and_odd_dims(dim):
    emb = timestep_embedding(torch.arange(5), dim)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)


def test_timestep_embedding_values():
    dim = 8
    emb = timestep_embedding(torch.tensor([0, 3]), dim)
    # t = 0: cosines 1, sines 0.
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(4), torch.zeros(4)]))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_timestep_embedding_int_float_and_distinct():
    t = torch.arange(0, 1000, 7)
    e_int = timestep_embedding(t, 64)
    torch.testing.assert_close(e_int, timestep_embedding(t.float(), 64))
    torch.testing.assert_close(timestep_embedding(5, 64), timestep_embedding(torch.tensor([5.0]), 64))
    # Different steps -> different embeddings (pairwise distances bounded away from zero).
    dist = torch.cdist(e_int, e_int) + torch.eye(len(t)) * 1e3
    assert dist.min() > 0.1
    # Fractional steps fall between their neighbours.
    e_half = timestep_embedding(torch.tensor([10.5]), 64)
    assert 0 < (e_half - timestep_embedding(torch.tensor([10]), 64)).norm() < 1


# ------------------------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("size", [8, 16, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_shapes(size, channels):
    model = UNet(channels, 2 * channels, size, **TINY)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, 2 * channels, size, size)


@pytest.mark.parametrize("size", [7, 28, 30])
def test_unet_odd_sizes_with_four_levels_and_resblock_updown(size):
    """28 -> 14 -> 7 -> 4 and back: upsampling must land on each skip's exact size."""
    for updown in (False, True):
        model = perturb(
            UNet(
                1,
                1,
                size,
                channels=8,
                channel_mult=(1, 1, 2, 2),
                num_res_blocks=1,
                attention_resolutions=(4,),
                num_heads=1,
                resblock_updown=updown,
            )
        )
        out = model(torch.randn(2, 1, size, size), torch.tensor([1, 2]))
        assert out.shape == (2, 1, size, size) and torch.isfinite(out).all()


def test_unet_fresh_output_is_zero():
    model = UNet(3, 6, 16, **TINY, num_classes=10)
    out = model(torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 500]), torch.tensor([1, 2, 10]))
    assert torch.count_nonzero(out) == 0


def test_unet_class_conditioning():
    model = perturb(UNet(1, 1, 8, **TINY, num_classes=10)).eval()
    assert model.label_embed.num_embeddings == 11
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    out_null = model(x, t)
    torch.testing.assert_close(out_null, model(x, t, torch.tensor([10, 10])))  # y=None is the null class
    out_y = model(x, t, torch.tensor([4, 7]))
    assert out_y.shape == (2, 1, 8, 8)
    assert not torch.allclose(out_y, out_null)
    # An unconditional model ignores y.
    plain = perturb(UNet(1, 1, 8, **TINY)).eval()
    torch.testing.assert_close(plain(x, t), plain(x, t, torch.tensor([4, 7])))


def test_unet_depends_on_time_and_accepts_float_t():
    model = perturb(UNet(1, 1, 8, **TINY)).eval()
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([10, 900]))
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out, model(x, torch.tensor([10.0, 900.0])))


@pytest.mark.parametrize("scale_shift", [True, False])
def test_unet_gradients_reach_every_parameter(scale_shift):
    model = perturb(UNet(1, 2, 8, **TINY, num_classes=3, dropout=0.1, use_scale_shift_norm=scale_shift))
    x = torch.randn(4, 1, 8, 8)
    loss = model(x, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for: {missing}"


def test_attention_block_matches_naive_reference():
    torch.manual_seed(0)
    block = perturb(AttentionBlock(32, num_heads=4), scale=0.2)
    x = torch.randn(2, 32, 5, 6)
    B, C, H, W = x.shape
    heads, d = 4, 8
    h = block.norm(x).reshape(B, C, H * W)
    qkv = F.conv1d(h, block.qkv.weight, block.qkv.bias).reshape(B, 3, heads, d, H * W)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, T)
    w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)  # (B, heads, T, T)
    a = torch.einsum("bhts,bhds->bhdt", w, v).reshape(B, C, H * W)
    ref = x + F.conv1d(a, block.proj.weight, block.proj.bias).reshape(B, C, H, W)
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_attention_block_takes_the_fused_cpu_kernel():
    """q, k, v with unit stride along d: scaled_dot_product_attention's flash kernel, not the unfused math."""
    from torch.profiler import profile

    block = AttentionBlock(16, num_heads=2)
    q, k, v = block.qkv_heads(torch.randn(2, 16, 4, 4))
    assert q.shape == (2, 2, 16, 8) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    with profile() as prof:
        block(torch.randn(2, 16, 4, 4, requires_grad=True)).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, sorted(names)


def test_attention_heads_from_head_channels_and_bad_heads():
    assert AttentionBlock(64, num_heads=1, num_head_channels=16).num_heads == 4
    with pytest.raises(ValueError, match="num_heads"):
        AttentionBlock(30, num_heads=4)
    with pytest.raises(ValueError, match="num_head_channels"):
        AttentionBlock(64, num_head_channels=24)


def test_group_norm_groups():
    assert [group_norm(c).num_groups for c in (3, 16, 48, 64, 256)] == [3, 16, 24, 32, 32]


def test_attention_levels_map_sizes_to_levels():
    assert attention_levels([32, 16, 8, 4], [16]) == {1}
    assert attention_levels([28, 14, 7], [16]) == {1}
    assert attention_levels([28, 14, 7], [8]) == {2}
    assert attention_levels([8, 4, 2], [16]) == set()
    assert attention_levels([7, 4], [7]) == {0}
    assert UNet(1, 1, 28, **{**TINY, "attention_resolutions": (16,)}).attention_levels == [1]


def test_unet_rejects_wrong_input_channels():
    with pytest.raises(ValueError, match="expected x of shape"):
        UNet(1, 1, 8, **TINY)(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (28, 1)])
def test_mlp_shapes_zero_init_and_conditioning(size, channels):
    model = MLP(channels, 2 * channels, size, hidden_dim=32, num_layers=2, num_classes=10)
    x, t = torch.randn(3, channels, size, size), torch.tensor([0, 5, 999])
    out = model(x, t)
    assert out.shape == (3, 2 * channels, size, size) and torch.count_nonzero(out) == 0
    perturb(model)
    out_y = model(x, t, torch.tensor([1, 2, 3]))
    assert not torch.allclose(out_y, model(x, t))
    out_y.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for: {missing}"


def test_mlp_rejects_other_image_sizes():
    with pytest.raises(ValueError, match="image_size"):
        MLP(1, 1, 8, hidden_dim=16, num_layers=1)(torch.randn(1, 1, 16, 16), torch.tensor([0]))


def test_count_parameters():
    model = torch.nn.Linear(3, 4)
    assert count_parameters(model) == 16
    model.bias.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 12


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_instantiate_and_run(path):
    cfg = OmegaConf.load(path)
    assert "_target_" in cfg
    for key in ("in_channels", "out_channels", "image_size", "num_classes"):
        assert key not in cfg, f"{path.name}: {key} is passed by the caller"
    model = instantiate(cfg, in_channels=1, out_channels=2, image_size=8, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 8, 8), torch.tensor([10]), torch.tensor([3]))
    assert out.shape == (1, 2, 8, 8)


def test_unet_cifar_matches_ddpm_parameter_count():
    """Ho et al. 2020 report 35.7M parameters for the CIFAR-10 model (this one: 35,746,307)."""
    cfg = OmegaConf.load(CONF / "unet_cifar.yaml")
    model = instantiate(cfg, in_channels=3, out_channels=3, image_size=32, num_classes=None)
    n = count_parameters(model)
    assert abs(n - 35.7e6) / 35.7e6 < 0.02, n
    assert model.attention_levels == [1]  # 16 x 16
