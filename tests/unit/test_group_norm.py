"""The U-Net's GroupNorm under autocast: in the activations' dtype (no fp32 round trip), exact in fp32.

CUDA autocast puts ``group_norm`` on its fp32 list; CPU autocast leaves it alone. The tests emulate CUDA's
rule on the CPU (an ``AutocastCPU`` kernel for ``aten::group_norm`` that casts to fp32, as the CUDA one
does), so the fp32 round trip that the GPU would pay is visible here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_lab.models import unet as unet_mod
from diffusion_lab.models.unet import GroupNorm, UNet, group_norm

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is within 2^-8 of the value (relative)


@pytest.fixture
def cuda_autocast_rule():
    """CPU autocast with CUDA's rule for group_norm: inputs, weight and bias cast to fp32."""
    lib = torch.library.Library("aten", "IMPL")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def group_norm_fp32(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
        with torch._C._ExcludeDispatchKeyGuard(keys):
            f = [None if t is None else t.float() for t in (x, weight, bias)]
            return torch.ops.aten.group_norm(f[0], num_groups, f[1], f[2], eps, cudnn_enabled)

    lib.impl("group_norm", group_norm_fp32, "AutocastCPU")
    yield
    lib._destroy()


class NormOutputs(TorchDispatchMode):
    """The dtypes of every ``native_group_norm`` output and of every cast to fp32, in call order."""

    def __init__(self):
        super().__init__()
        self.norms: list[torch.dtype] = []
        self.casts_to_fp32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_group_norm.default:
            self.norms.append(out[0].dtype)
        elif func is torch.ops.aten._to_copy.default and out.dtype == torch.float32 and out.ndim == 4:
            self.casts_to_fp32 += 1
        return out


def _unet(**kw) -> UNet:
    torch.manual_seed(0)
    net = UNet(3, 3, 16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[8], **kw)
    for p in net.parameters():  # zero-initialised output layers would hide differences
        nn.init.normal_(p, std=0.2)
    return net


def _as_torch_group_norm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose GroupNorms are ``nn.GroupNorm`` itself."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, GroupNorm):
            m.__class__ = nn.GroupNorm
    return net


def test_group_norm_is_torch_group_norm_in_fp32():
    """fp32, with and without autocast, eager: bit for bit ``nn.GroupNorm``, alone and inside the U-Net."""
    torch.manual_seed(1)
    norm = group_norm(64)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    ref = _as_torch_group_norm(norm)
    x = torch.randn(4, 64, 8, 8) * 3 + 1
    assert norm.num_groups == 32 and isinstance(norm, nn.GroupNorm)
    assert torch.equal(norm(x), ref(x))
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(norm(x), ref(x))  # an fp32 input stays fp32
    net = _unet()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 700])
    assert torch.equal(net(x, t), _as_torch_group_norm(net)(x, t))


def _fp64_reference(x, groups, weight, bias, eps=1e-5):
    return F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)


@pytest.mark.parametrize("mixed_dtype_params", [True, False], ids=["fp32-params", "bf16-params"])
@pytest.mark.parametrize("offset", [0.0, 20.0])
def test_bf16_group_norm_within_one_rounding_of_fp64(monkeypatch, mixed_dtype_params, offset):
    """Under bf16 autocast the output is bf16 and within one bf16 rounding (2^-8 of the largest value) of the
    fp64 norm of the same bf16 input: the statistics are accumulated in fp32 (bf16 statistics miss this by
    2-3x: 0.007-0.009 measured, against 0.0024-0.0030 for the kernel). A mean far from zero (``offset``) is
    where bf16 statistics would fail first. Both weight paths: fp32 weight and bias beside the bf16 input
    (CPU) and weight and bias cast to bf16 (the path CUDA takes)."""
    monkeypatch.setattr(unet_mod, "_MIXED_DTYPE_DEVICES", ("cpu",) if mixed_dtype_params else ())
    torch.manual_seed(2)
    norm = GroupNorm(32, 128)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(8, 128, 16, 16) * 3 + offset).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    w = norm.weight if mixed_dtype_params else norm.weight.bfloat16()
    b = norm.bias if mixed_dtype_params else norm.bias.bfloat16()
    ref = _fp64_reference(x, 32, w, b)
    err = (out.double() - ref).abs().max().item()
    assert err <= BF16_EPS * ref.abs().max().item(), err


def test_cuda_autocast_rule_emulated(cuda_autocast_rule):
    """The emulation does what CUDA autocast does to ``nn.GroupNorm``: a bf16 input comes out in fp32."""
    x = torch.randn(2, 16, 4, 4).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        assert nn.GroupNorm(4, 16)(x).dtype == torch.float32
        assert GroupNorm(4, 16)(x).dtype == torch.bfloat16


def test_no_fp32_between_the_ops_of_a_bf16_unet(cuda_autocast_rule):
    """A U-Net forward + backward under bf16 autocast (CUDA's rule for group_norm): every GroupNorm output is
    bf16 and no activation is cast to fp32; ``fp32_norm=True`` gives torch's fp32 round trip back."""
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 700])
    counts = {}
    for fp32_norm in (False, True):
        net = _unet(fp32_norm=fp32_norm)
        with torch.autocast("cpu", torch.bfloat16), NormOutputs() as rec:
            out = net(x, t)
        out.float().square().mean().backward()
        counts[fp32_norm] = rec
    new, old = counts[False], counts[True]
    # 8 ResBlocks x 2 (1 per level down, 2 in the middle, 2 per level up), 4 attention blocks, the output norm
    assert len(new.norms) == len(old.norms) == 21
    assert set(new.norms) == {torch.bfloat16} and new.casts_to_fp32 == 0
    assert set(old.norms) == {torch.float32} and old.casts_to_fp32 >= len(old.norms) - 1


def test_bf16_norm_keeps_the_unet_close_to_fp32():
    """The U-Net's output in bf16 autocast with the bf16 norm is as close to its fp32 output as with torch's
    fp32 norm (relative RMS error; bf16 rounding of every layer sets both)."""
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([3, 200, 500, 900])
    errs = {}
    for fp32_norm in (False, True):
        net = _unet(fp32_norm=fp32_norm)
        ref = net(x, t)
        with torch.autocast("cpu", torch.bfloat16):
            out = net(x, t).float()
        errs[fp32_norm] = ((out - ref).norm() / ref.norm()).item()
    assert errs[False] < 0.02 and errs[True] < 0.02, errs
    assert errs[False] < 2 * errs[True] + 1e-3, errs


def test_group_norm_compiles_without_a_graph_break():
    """The autocast switch traces in one graph (torch.compile, fullgraph; the eager backend: no C++ build)."""
    norm = GroupNorm(4, 16)
    x = torch.randn(2, 16, 4, 4).bfloat16()
    compiled = torch.compile(norm, backend="eager", fullgraph=True)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(compiled(x), norm(x))
    assert torch.equal(compiled(x.float()), norm(x.float()))
