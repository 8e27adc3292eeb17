"""``load_module`` returns the module on the requested device, and a backbone refuses inputs on another device
than its weights in one line. No CUDA here: the "meta" device stands in for a second device."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.models import MLP, UNet
from diffusion_lab.training.checkpoint import load_module, read_checkpoint


def _devices(module) -> set[torch.device]:
    return {p.device for p in module.parameters()} | {b.device for b in module.buffers()}


@pytest.mark.parametrize("map_location", ["meta", torch.device("meta"), {"cpu": "meta"}])
def test_load_module_puts_the_module_where_map_location_says(tiny_checkpoint, map_location):
    """A device (str or torch.device) and a dict remapping storages both give a module wholly on "meta";
    before the fix it was built on the CPU and the meta weights could not be copied into it."""
    module, _, ckpt = load_module(tiny_checkpoint, map_location=map_location)
    assert _devices(module) == {torch.device("meta")}
    assert module.device == torch.device("meta")  # Lightning's own record of the device agrees
    assert {v.device for v in ckpt["state_dict"].values()} == {torch.device("meta")}


@pytest.mark.parametrize(
    "map_location", ["cpu", torch.device("cpu"), None, lambda storage, location: storage]
)
@pytest.mark.parametrize("ema", [True, False])
def test_load_module_on_the_cpu_holds_the_stored_weights(tiny_checkpoint, map_location, ema):
    module, _, _ = load_module(tiny_checkpoint, map_location=map_location, ema=ema)
    assert _devices(module) == {torch.device("cpu")}
    stored = read_checkpoint(tiny_checkpoint)["state_dict" if ema else "current_model_state"]
    weights = module.state_dict()
    assert set(weights) == set(stored)
    for key, value in stored.items():
        assert torch.equal(weights[key], value), key


def test_load_module_moves_the_built_module_to_a_requested_device(tiny_checkpoint, monkeypatch):
    """The module is moved with one ``.to(device)`` of the requested device (here "cuda:1", with the load
    itself kept on the CPU, since this machine has no GPU), before the weights are copied into it."""
    import diffusion_lab.training.checkpoint as checkpoint
    from diffusion_lab.training.lit_module import DiffusionModule

    calls = []
    monkeypatch.setattr(DiffusionModule, "to", lambda self, *a, **k: calls.append((a, k)) or self)
    real_read = checkpoint.read_checkpoint
    monkeypatch.setattr(checkpoint, "read_checkpoint", lambda path, map_location: real_read(path, "cpu"))
    load_module(tiny_checkpoint, map_location="cuda:1")
    assert calls == [((torch.device("cuda:1"),), {})]


def test_load_module_refuses_weights_mapped_to_several_devices(tiny_checkpoint, monkeypatch):
    """A map_location that is no device (here a callable) and leaves the weights on two devices: one line."""
    import diffusion_lab.training.checkpoint as checkpoint

    real_read = checkpoint.read_checkpoint

    def mixed(path, map_location):  # as a remapping callable could leave it: one tensor on meta
        ckpt = real_read(path, "cpu")
        first = next(iter(ckpt["state_dict"]))
        ckpt["state_dict"][first] = ckpt["state_dict"][first].to("meta")
        return ckpt

    monkeypatch.setattr(checkpoint, "read_checkpoint", mixed)
    with pytest.raises(ValueError, match=r"weights on several devices \(cpu, meta\); give one device") as e:
        load_module(tiny_checkpoint, map_location=lambda storage, location: storage)
    assert "\n" not in str(e.value)


def _unet():
    torch.manual_seed(0)
    return UNet(1, 1, 8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=())


def _mlp():
    torch.manual_seed(0)
    return MLP(1, 1, 8, hidden_dim=16, num_layers=1, num_classes=3)


def _dit():
    from diffusion_lab.models.dit import DiT

    return DiT(1, 1, 8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)


@pytest.mark.parametrize(("name", "make"), [("UNet", _unet), ("MLP", _mlp), ("DiT", _dit)])
@pytest.mark.parametrize(
    ("weights", "x", "t", "named"),
    [
        ("meta", "cpu", "cpu", "input x on cpu, t on cpu but the weights on meta"),  # was a deep RuntimeError
        ("meta", "meta", "cpu", "input t on cpu but the weights on meta"),  # t was moved silently
        ("cpu", "cpu", "meta", "input t on meta but the weights on cpu"),  # was "Cannot copy out of meta"
    ],
)
def test_inputs_on_another_device_than_the_weights_are_refused_in_one_line(name, make, weights, x, t, named):
    model = make().to(weights)
    xs, ts = torch.zeros(2, 1, 8, 8, device=x), torch.tensor([3, 7], device=t)
    expected = f"^{name}: {named}: put the model and its inputs on one device"
    with pytest.raises(ValueError, match=expected) as e:
        model(xs, ts)
    assert "\n" not in str(e.value)


def test_labels_on_another_device_are_refused_and_same_device_inputs_run():
    model = _mlp()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with pytest.raises(ValueError, match="^MLP: input y on meta but the weights on cpu"):
        model(x, t, torch.tensor([0, 1], device="meta"))
    out = model(x, t, torch.tensor([0, 1]))
    assert out.shape == (2, 1, 8, 8) and out.device == torch.device("cpu")
    # a Python number for t is one time for the whole batch, made on the weights' device
    y = torch.tensor([0, 1])
    assert torch.equal(model(x, 5, y), model(x, torch.tensor([5, 5]), y))
    unet = _unet()
    assert torch.equal(unet(x, 5), unet(x, torch.tensor([5, 5])))
    meta = _unet().to("meta")
    assert meta(x.to("meta"), torch.tensor([3, 7], device="meta")).device == torch.device("meta")
