"""DiT (Peebles & Xie 2023): adaLN-Zero at init, patch layout, positions, guidance, Table 1, training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.models import DiT, count_parameters
from diffusion_lab.models.dit import DiTBlock, FinalLayer, patchify, sincos_pos_embed_2d, unpatchify
from diffusion_lab.processes.diffusion import GaussianDiffusion
from diffusion_lab.processes.schedules import make_schedule
from diffusion_lab.samplers import guided_model_output

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so the zero-initialised layers stop hiding the rest of the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny(num_classes: int | None = 10, out_channels: int = 1, image_size: int = 8, **kw) -> DiT:
    torch.manual_seed(0)
    return DiT(1, out_channels, image_size, num_classes=num_classes, **{**TINY, **kw})


# ------------------------------------------------------------------------------------ adaLN-Zero at init


@pytest.mark.parametrize("num_classes", [None, 10])
@pytest.mark.parametrize("out_channels", [1, 2])
def test_output_is_exactly_zero_at_init(num_classes, out_channels):
    model = tiny(num_classes, out_channels)
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 10, 999]), None if num_classes is None else torch.tensor([0, 4, 10]))
    assert out.shape == (3, out_channels, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_every_block_is_the_identity_at_init():
    model = DiT(1, 1, 8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10)
    tokens = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    # the rest of the network is not zero: positions, patch and conditioning embeddings are live
    assert model.patch_embed.weight.abs().sum() > 0 and model.time_embed[0].weight.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0 and model.blocks[0].mlp[0].weight.abs().sum() > 0


def test_initialisation_follows_the_paper():
    model = DiT(1, 2, 8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    w = model.blocks[0].mlp[0].weight  # (256, 64): Xavier uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / (64 + 256)) and w.abs().max() > 0.8 * math.sqrt(6 / 320)
    pe = model.patch_embed.weight  # fan-in C p p = 4, fan-out 64
    assert pe.abs().max() <= math.sqrt(6 / (4 + 64)) and pe.abs().max() > 0.8 * math.sqrt(6 / 68)
    assert abs(model.label_embed.weight.std().item() - 0.02) < 0.004
    assert abs(model.time_embed[0].weight.std().item() - 0.02) < 0.002
    assert all(torch.equal(b.adaLN_modulation[-1].weight, torch.zeros_like(b.adaLN_modulation[-1].weight))
               for b in model.blocks)  # fmt: skip
    assert "pos_embed" not in model.state_dict()  # fixed, not learned
    assert not any(p is model.pos_embed for p in model.parameters())


def test_adaln_modulation_has_six_chunks_and_gates_the_residuals():
    """With the gates zero and everything else random, the block is still the identity (gated residuals)."""
    model = perturb(tiny())
    block = model.blocks[0]
    D = model.hidden_size
    assert block.adaLN_modulation[-1].out_features == 6 * D
    with torch.no_grad():
        lin = block.adaLN_modulation[-1]
        for k in (2, 5):  # gate_msa, gate_mlp
            lin.weight[k * D : (k + 1) * D] = 0
            lin.bias[k * D : (k + 1) * D] = 0
    tokens, c = torch.randn(2, 16, D), torch.randn(2, D)
    assert torch.equal(block(tokens, c), tokens)
    with torch.no_grad():
        lin.bias[2 * D : 3 * D] = 1.0  # open the attention gate
    assert not torch.allclose(block(tokens, c), tokens)


# ------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    "p,shape", [(1, (2, 3, 4, 4)), (2, (2, 1, 8, 8)), (4, (1, 3, 8, 12)), (2, (2, 8, 6, 4))]
)
def test_unpatchify_inverts_patchify(p, shape):
    x = torch.randn(shape)
    tokens = patchify(x, p)
    h, w = shape[2] // p, shape[3] // p
    assert tokens.shape == (shape[0], h * w, p * p * shape[1])
    assert torch.equal(unpatchify(tokens, p, h, w), x)


def test_patch_layout_is_row_major_and_matches_the_convolution():
    """Token k is patch (k // w, k % w); the strided convolution is a Linear on patchify's tokens."""
    x = torch.randn(2, 3, 8, 12)
    p = 4
    tokens = patchify(x, p)  # (2, 6, 48), grid 2 x 3
    assert torch.equal(tokens[:, 4], x[:, :, 4:8, 4:8].permute(0, 2, 3, 1).reshape(2, -1))
    model = DiT(3, 3, 8, patch_size=p, hidden_size=16, depth=1, num_heads=2)
    conv = model.patch_embed(x).flatten(2).transpose(1, 2)  # (2, 6, 16)
    W = model.patch_embed.weight.permute(0, 2, 3, 1).reshape(16, -1)  # (D, p p C) in (p, p, C) order
    torch.testing.assert_close(conv, tokens @ W.T + model.patch_embed.bias, atol=1e-5, rtol=1e-5)


def test_patch_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.randn(1, 1, 6, 6), 4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(1, 1, 10, patch_size=4, hidden_size=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        DiT(1, 1, 8, patch_size=2, hidden_size=16, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="expected x of shape"):
        tiny()(torch.randn(1, 3, 8, 8), torch.tensor([1]))


def test_sincos_positions_closed_form_rows_and_columns():
    D, h, w = 16, 3, 5
    pe = sincos_pos_embed_2d(D, h, w)  # (15, 16)
    assert pe.shape == (h * w, D)
    k = 2 * w + 3  # row 2, column 3
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)  # D / 4 frequencies per axis
    expect = torch.cat(  # column first, then row
        [torch.sin(3 * omega), torch.cos(3 * omega), torch.sin(2 * omega), torch.cos(2 * omega)]
    )
    torch.testing.assert_close(pe[k].double(), expect, atol=1e-6, rtol=0)
    grid = pe.reshape(h, w, D)
    assert torch.equal(grid[0, :, : D // 2], grid[2, :, : D // 2])  # first half: the column only
    assert torch.equal(grid[:, 0, D // 2 :], grid[:, 4, D // 2 :])  # second half: the row only
    assert torch.cdist(pe, pe).add(torch.eye(h * w)).min() > 0.1  # every position distinct


def mae_pos_embed(dim: int, h: int, w: int) -> np.ndarray:
    """MAE's ``get_2d_sincos_pos_embed`` (facebookresearch/mae util/pos_embed.py, copied by DiT), written out
    for an h x w grid: (h w, dim)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, h, w)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,h,w", [(16, 3, 5), (16, 5, 3), (32, 4, 4), (8, 2, 2)])
def test_sincos_positions_equal_mae_and_dit(dim, h, w):
    torch.testing.assert_close(
        sincos_pos_embed_2d(dim, h, w).double(), torch.from_numpy(mae_pos_embed(dim, h, w)), atol=1e-6, rtol=0
    )


def test_checkpoint_without_pos_embed_version_keeps_its_row_first_table():
    """Version 1 of the table (row in the first half) is the one state_dicts without ``pos_embed_version``
    were trained with: loading one rebuilds it, for the built size and for others; version 2 round-trips."""
    trained = perturb(tiny())
    assert int(trained.state_dict()["pos_embed_version"]) == 2
    # as the training module holds it ("model." keys), through a copy as the EMA callback makes one
    old_state = {f"model.{k}": v for k, v in trained.state_dict().items() if k != "pos_embed_version"}
    parent = copy.deepcopy(torch.nn.ModuleDict({"model": tiny()}))
    parent.load_state_dict(old_state)
    old = parent["model"]
    assert "model.pos_embed_version" not in old_state and int(old.pos_embed_version) == 1

    def rows_first(h, w):  # the MAE table with its halves swapped
        return torch.from_numpy(mae_pos_embed(32, h, w)).float().roll(16, dims=1)

    torch.testing.assert_close(old.pos_embed[0], rows_first(4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(old.positions(3, 5, old.pos_embed)[0], rows_first(3, 5), atol=1e-6, rtol=0)
    assert int(old.state_dict()["pos_embed_version"]) == 1  # and it saves as version 1 again
    new = tiny()
    new.load_state_dict(old.state_dict() | {"pos_embed_version": torch.tensor(2)})
    torch.testing.assert_close(new.pos_embed[0], torch.from_numpy(mae_pos_embed(32, 4, 4)).float())
    with pytest.raises(ValueError, match="unknown pos_embed_version 3"):
        new.load_state_dict(old.state_dict() | {"pos_embed_version": torch.tensor(3)})


def test_other_input_sizes_get_fresh_positions():
    model = perturb(tiny(image_size=8))
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(32, 4, 4))
    out = model(torch.randn(2, 1, 12, 16), torch.tensor([3, 7]), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 12, 16) and torch.isfinite(out).all()


# ----------------------------------------------------- the reference network (facebookresearch/DiT)
# Written out from DiT's models.py and timm's Attention / Mlp, on the module's own parameter tensors, so the
# comparisons check the wiring: chunk order of the modulation, 1 + scale, the fused qkv layout, the heads.


def ref_layer_norm(x):
    """LayerNorm(elementwise_affine=False, eps=1e-6) over the last axis."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def ref_linear(layer, x):
    return x @ layer.weight.T + layer.bias


def ref_attention(attn, x, heads):
    """timm's Attention: qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4), then
    softmax(q k^T / sqrt(head_dim)) v per head."""
    B, N, D = x.shape
    d = D // heads
    q, k, v = ref_linear(attn.qkv, x).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v  # (B, heads, N, d)
    return ref_linear(attn.proj, a.transpose(1, 2).reshape(B, N, D))


def ref_mlp(mlp, x):
    """Linear -> GELU (tanh approximation) -> Linear."""
    h = ref_linear(mlp[0], x)
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return ref_linear(mlp[2], h)


def ref_block(block, x, c, heads):
    mod = ref_linear(block.adaLN_modulation[1], F.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * ref_attention(
        block.attn, ref_modulate(ref_layer_norm(x), shift_msa, scale_msa), heads
    )
    return x + gate_mlp.unsqueeze(1) * ref_mlp(
        block.mlp, ref_modulate(ref_layer_norm(x), shift_mlp, scale_mlp)
    )


def ref_final_layer(final, x, c):
    shift, scale = ref_linear(final.adaLN_modulation[1], F.silu(c)).chunk(2, dim=1)
    return ref_linear(final.linear, ref_modulate(ref_layer_norm(x), shift, scale))


def ref_timestep_embedding(t, dim=256, max_period=10000):
    """DiT's TimestepEmbedder.timestep_embedding (GLIDE), float32 as there: [cos(t f), sin(t f)],
    f_i = max_period^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_dit(model, x, t, y, heads):
    """DiT.forward of facebookresearch/DiT for an h x w patch grid, labels y (None: the null class)."""
    B, C, H, W = x.shape
    p = model.patch_size
    h, w = H // p, W // p
    patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)  # conv order
    tokens = patches @ model.patch_embed.weight.reshape(model.hidden_size, -1).T + model.patch_embed.bias
    tokens = tokens + torch.from_numpy(mae_pos_embed(model.hidden_size, h, w)).float().to(x.dtype)  # as DiT
    te = model.time_embed
    c = ref_linear(te[2], F.silu(ref_linear(te[0], ref_timestep_embedding(t).to(x.dtype))))
    if model.label_embed is not None:
        labels = torch.full((B,), model.num_classes) if y is None else y
        c = c + model.label_embed.weight[labels]
    for block in model.blocks:
        tokens = ref_block(block, tokens, c, heads)
    out = ref_final_layer(model.final_layer, tokens, c).reshape(B, h, w, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, -1, h * p, w * p)


def randomise(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn N(0, std^2) in float64: modulation shifts, scales and gates all non-zero and
    distinct, so a swap of any two of them changes the output."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for prm in module.parameters():
            prm.normal_(0.0, std)
    return module


def test_dit_block_matches_the_reference_block():
    D, heads = 24, 3  # head_dim 8 != heads, so a transposed (head_dim, heads) split shows
    block = randomise(DiTBlock(D, heads, mlp_ratio=2.0))
    x, c = torch.randn(2, 6, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    with torch.no_grad():
        out, ref = block(x, c), ref_block(block, x, c, heads)
    assert (out - x).abs().mean() > 0.1  # the residual branches are live
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_final_layer_matches_the_reference_final_layer():
    D, p, C = 16, 2, 3
    final = randomise(FinalLayer(D, p, C))
    x, c = torch.randn(2, 6, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    with torch.no_grad():
        out = final(x, c)
    assert out.shape == (2, 6, p * p * C)
    torch.testing.assert_close(out, ref_final_layer(final, x, c), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("size", [(8, 8), (8, 12)], ids=["built", "other"])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_forward_matches_the_reference_network(size, num_classes):
    """The whole network on random weights, at the built size (stored table) and a non-square other size."""
    model = randomise(
        DiT(2, 3, 8, patch_size=2, hidden_size=24, depth=2, num_heads=3, num_classes=num_classes)
    )
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    t = torch.tensor([3, 700])
    y = None if num_classes is None else torch.tensor([4, 10])
    with torch.no_grad():
        out = model(x, t, y)
        ref = ref_dit(model, x, t, y, heads=3)
        assert out.shape == (2, 3, *size)
        torch.testing.assert_close(out, ref, atol=1e-7, rtol=1e-7)  # float32 tables, as DiT
        if num_classes is not None:
            torch.testing.assert_close(
                model(x, t, None), ref_dit(model, x, t, None, heads=3), atol=1e-7, rtol=1e-7
            )


# ------------------------------------------------------------------------------------- conditioning


def test_output_depends_on_time_and_label_and_null_class_is_num_classes():
    model = perturb(tiny()).eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([5, 500])
    y = torch.tensor([3, 7])
    with torch.no_grad():
        base = model(x, t, y)
        assert not torch.allclose(base, model(x, t + 100, y))
        assert not torch.allclose(base, model(x, t, torch.tensor([4, 8])))
        assert torch.equal(model(x, t, None), model(x, t, torch.tensor([10, 10])))
        assert torch.equal(model(x, t.float(), y), base)  # float steps embed the same
    unconditional = perturb(tiny(num_classes=None)).eval()
    with torch.no_grad():
        assert torch.equal(unconditional(x, t, y), unconditional(x, t, None))


def test_examples_of_a_batch_do_not_interact():
    """Guidance runs conditional and null halves as one batch: each example must be computed alone."""
    model = perturb(tiny()).eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 50, 300, 999]), torch.tensor([0, 3, 10, 9])
    with torch.no_grad():
        full = model(x, t, y)
        for i in range(4):
            torch.testing.assert_close(full[i : i + 1], model(x[i : i + 1], t[i : i + 1], y[i : i + 1]))


@pytest.mark.parametrize("out_channels", [1, 2])
def test_guidance_scale_one_is_the_conditional_forward_and_scale_s_is_the_cfg_formula(out_channels):
    model = perturb(tiny(out_channels=out_channels)).eval()
    variance = "learned_range" if out_channels == 2 else "fixed_small"
    diffusion = GaussianDiffusion(make_schedule("linear", 50), parameterization="eps", variance=variance)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 20, 49]), torch.tensor([1, 5, 9])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, None)
        assert not torch.allclose(cond, uncond)
        torch.testing.assert_close(guided_model_output(model, diffusion, x, t, y, guidance_scale=1.0), cond)
        guided = guided_model_output(model, diffusion, x, t, y, guidance_scale=3.0)  # one batch of 2B
    torch.testing.assert_close(guided[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(guided[:, 1:], cond[:, 1:])  # learned variance: the conditional half


# ----------------------------------------------------------------------------- the paper's Table 1


@pytest.mark.parametrize(
    "hidden,heads,patch,params_m,gmacs",
    [(384, 6, 2, 33, 6.06), (384, 6, 4, 33, 1.41), (768, 12, 2, 130, 23.01), (768, 12, 4, 130, 5.56)],
    ids=["S/2", "S/4", "B/2", "B/4"],
)
def test_table1_parameters_and_flops(hidden, heads, patch, params_m, gmacs):
    """DiT-S and DiT-B on 32x32x4 latents, 1,000 classes, learned sigma (8 output channels): Table 1 prints
    33M / 130M parameters and "Gflops" that are multiply-adds (fvcore's count), attention included.
    Built on the meta device: shapes only, no memory, no initialisation cost."""
    from experiments.bench.setups import flops_per_image

    with torch.device("meta"):
        model = DiT(
            4, 8, 32, patch_size=patch, hidden_size=hidden, depth=12, num_heads=heads, num_classes=1000
        )
        macs = flops_per_image(model, (4, 32, 32), backward=False) / 2
    assert round(count_parameters(model) / 1e6) == params_m
    assert abs(macs / 1e9 - gmacs) < 0.01  # one unit of the last digit Table 1 prints


# ---------------------------------------------------------------------------------------- training


def test_a_few_steps_lower_the_loss_on_the_digits(tmp_path):
    """Held-out eps-loss at fixed (t, eps): mean(eps^2) for the zero network at init, well below it after
    40 steps."""
    from diffusion_lab.data import DiffusionDataModule

    dm = DiffusionDataModule(name="digits", image_size=8, cache_dir=tmp_path)
    dm.prepare_data()
    x_train, y_train = dm.real_images("train")
    x_train = x_train.float() / 127.5 - 1.0
    x_val, y_val = dm.real_images("val", n=64)
    x_val = x_val.float() / 127.5 - 1.0
    diffusion = GaussianDiffusion(make_schedule("linear", 100), parameterization="eps")
    torch.manual_seed(0)
    model = DiT(1, 1, 8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    g = torch.Generator().manual_seed(1)
    t_val = torch.randint(0, 100, (64,), generator=g)
    eps_val = torch.randn(x_val.shape, generator=g)

    def val_loss() -> float:
        with torch.no_grad():
            return diffusion.training_losses(model, x_val, t_val, eps_val, y_val)["loss"].mean().item()

    before = val_loss()
    torch.testing.assert_close(before, F.mse_loss(torch.zeros_like(eps_val), eps_val).item())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        i = torch.randint(0, len(x_train), (64,), generator=g)
        loss = diffusion.training_losses(model, x_train[i], y=y_train[i])["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < 0.6 * before, (before, after)


def test_backbone_study_backbones_are_matched_in_training_flops():
    """experiments/backbones compares unet_tiny and two DiTs at equal training FLOPs per image (within 5%)."""
    from experiments.backbones.match import TOLERANCE, measure

    rows = measure()
    assert set(rows) == {"unet_tiny", "dit_p4", "dit_p2"}
    assert all(abs(r["vs_reference"] - 1) <= TOLERANCE for r in rows.values()), rows
    assert rows["unet_tiny"]["train_gflop"] > 0.3  # the U-Net is counted, not skipped on the meta device
