"""The Python API and the export folder: a checkpoint and its export sample the same images for every family,
the export layout is a model hub's, a tampered folder is refused in one line, and the README's examples run.

The exported folder is read without pickle: ``torch.load`` and ``pickle`` raise while one loads.
"""

from __future__ import annotations

import json
import pickle
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FAST, REPO, compose_config
from safetensors.torch import load_file, save_file

import diffusion_lab
from diffusion_lab.api import Pipeline, Samples
from diffusion_lab.export import EXPORTED, export

# family -> training overrides: a stored sampler of few steps, so that pipe.sample() without options is quick
FAMILIES = {
    "eps": ["sampler=ddim", "sampler.steps=5"],
    "edm": ["objective=edm", "sampler=heun", "sampler.steps=4"],
    "flow": ["objective=flow", "sampler=euler", "sampler.steps=4"],
    "interpolant": [
        "objective=interpolant",
        "sampler=euler_maruyama",
        "sampler.steps=4",
        "class_conditional=true",
    ],
}
CKPT = ["callbacks=default", "callbacks.sample_grid=null", "callbacks.progress_bar=null"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (last.ckpt of a 6-step run of a tiny MLP on 8x8 digits, its exported folder)."""
    from diffusion_lab.train import train

    out = {}
    for family, overrides in FAMILIES.items():
        root = tmp_path_factory.mktemp(family)
        cfg = compose_config(
            root,
            FAST
            + CKPT
            + [
                "trainer.max_steps=6",
                "trainer.val_check_interval=6",
                "callbacks.model_checkpoint.every_n_train_steps=6",
            ]
            + overrides,
        )
        ckpt = Path(train(cfg)["last_checkpoint"])
        out[family] = (ckpt, export(ckpt, root / "export"))
    return out


@pytest.fixture
def no_pickle(monkeypatch):
    """torch.load and pickle raise while the fixture is active."""

    def refuse(*args, **kwargs):
        raise AssertionError("an exported folder was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message, message
    return message


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_and_export_sample_the_same_images(runs, family, monkeypatch):
    ckpt, folder = runs[family]
    from_ckpt = diffusion_lab.load(ckpt, device="cpu")
    with monkeypatch.context() as m:
        for target in (torch, pickle):
            for name in ("load", "loads"):
                if hasattr(target, name):
                    m.setattr(target, name, lambda *a, **k: pytest.fail("an exported folder was unpickled"))
        from_folder = diffusion_lab.load(folder, device="cpu")
    assert isinstance(from_folder, Pipeline) and from_folder.info == {"global_step": 6, "weights": "ema"}
    state, loaded = from_ckpt.module.state_dict(), from_folder.module.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)
    assert type(from_folder.process) is type(from_ckpt.process)
    assert from_folder.config.objective == from_ckpt.config.objective

    # the run's own sampler, two batches (seed, seed + 1), then another sampler with options
    a, b = from_ckpt.sample(6, seed=3, batch_size=4), from_folder.sample(6, seed=3, batch_size=4)
    assert isinstance(a, Samples) and a.images.shape == (6, 1, 8, 8) and a.images.dtype == torch.float32
    assert a.images.abs().max() <= 1 and torch.equal(a.images, b.images) and a.nfe == b.nfe > 0
    assert torch.equal(a.images[:4], from_ckpt.sample(4, seed=3).images)  # batch i from seed + i
    second = dict(labels=[4, 5]) if from_ckpt.class_conditional else {}  # the classes cycle on
    assert torch.equal(a.images[4:], from_ckpt.sample(2, seed=4, **second).images)
    kwargs = dict(sampler="heun", steps=3, grid="karras", seed=0)
    if from_ckpt.class_conditional:
        kwargs.update(labels=[0, 1, 2, 9], guidance=2.0)
        assert a.labels.tolist() == [0, 1, 2, 3, 4, 5]  # None cycles through the classes
    else:
        assert a.labels is None
    c, d = from_ckpt.sample(4, **kwargs), from_folder.sample(4, **kwargs)
    assert torch.equal(c.images, d.images) and c.sampler.startswith("heun: steps=3 grid=karras")
    if from_ckpt.class_conditional:  # the labels and the guidance reach the network
        assert c.labels.tolist() == [0, 1, 2, 9] and "guidance_scale=2.0" in c.sampler
        for changed in (dict(labels=[1, 1, 2, 9]), dict(guidance=None)):
            assert not torch.equal(c.images, from_ckpt.sample(4, **{**kwargs, **changed}).images), changed

    # the denoiser: the same on both sides, continuous except for the discrete family
    x, sigma = (
        torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2,
        torch.tensor([0.5, 2.0, 2.0]),
    )
    y = torch.tensor([1, 2, 3]) if from_ckpt.class_conditional else None
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt.denoiser(x, sigma, y), from_folder.denoiser(x, sigma, y))
    assert from_ckpt.denoiser.continuous == (family != "eps")

    # uint8 and PIL views of the same images
    u8 = a.to_uint8()
    assert u8.dtype == torch.uint8 and torch.equal(u8, torch.round((a.images + 1) * 127.5).to(torch.uint8))
    image = a.to_pil()[0]
    assert image.mode == "L" and image.size == (8, 8) and np.array_equal(np.asarray(image), u8[0, 0].numpy())


def test_discrete_denoiser_is_the_x0_prediction_at_the_nearest_step(runs):
    pipe = diffusion_lab.load(runs["eps"][0], device="cpu")
    d, t = pipe.process, 20
    ab = float(d.alphas_cumprod[t])
    sigma = ((1 - ab) / ab) ** 0.5
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = torch.full((2,), t)
    with torch.no_grad():
        want = d.p_mean_variance(pipe.model(x_t, steps), x_t, steps, clip_denoised=False).pred_x0
        got = pipe.denoiser(x_t * (1 + sigma**2) ** 0.5, sigma * 1.01)  # rounded to step t
    torch.testing.assert_close(got, want)


def test_sample_options_are_checked_in_one_line(runs):
    pipe = diffusion_lab.load(runs["eps"][0], device="cpu")
    cases = {
        "labels": (dict(labels=3), "unconditional"),
        "steps": (dict(steps=10_000), "steps=10000 is not valid"),
        "unknown sampler": (dict(sampler="ddim2"), "not a sampler config"),
        "unknown option": (dict(sampler="ddim", S_churn=1.0), "S_churn is not an option of the ddim sampler"),
        "option of the run's sampler": (dict(eta2=1.0), "eta2 is not an option of the run's own sampler"),
        "n": (dict(n=0), "n=0 is not valid"),
    }
    for name, (kwargs, words) in cases.items():
        kwargs = {"n": 2, **kwargs}
        with pytest.raises(ValueError) as excinfo:
            pipe.sample(kwargs.pop("n"), **kwargs)
        assert words in _one_line_error(excinfo), name


def test_dtype_casts_the_network_and_keeps_float32_samples(runs):
    ckpt = runs["edm"][0]
    full, half = (
        diffusion_lab.load(ckpt, device="cpu"),
        diffusion_lab.load(ckpt, device="cpu", dtype=torch.bfloat16),
    )
    assert half.dtype == torch.bfloat16 and next(half.model.parameters()).dtype == torch.bfloat16
    a, b = full.sample(4, seed=0), half.sample(4, seed=0)
    assert b.images.dtype == torch.float32 and (a.images - b.images).abs().max() < 0.1


def test_load_takes_a_run_directory_and_refuses_other_paths(runs, tmp_path):
    ckpt = runs["eps"][0]
    assert diffusion_lab.load(ckpt.parents[1], device="cpu").source == str(
        ckpt.parents[1] / "checkpoints" / "last.ckpt"
    )
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        diffusion_lab.load(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError) as excinfo:
        diffusion_lab.load(tmp_path)
    assert "neither an exported model" in _one_line_error(excinfo)


# ------------------------------------------------------------------------------------------ the commands


def test_sample_command_on_an_export_draws_what_pipe_sample_draws(runs, tmp_path, run_command):
    ckpt, folder = runs["interpolant"]
    r = run_command(
        "diffusion_lab.sample",
        [f"ckpt={folder}", "n=5", "seed=2", "batch_size=4", "device=cpu", f"out={tmp_path / 's'}"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    stored = np.load(tmp_path / "s" / "samples.npz")
    expected = diffusion_lab.load(ckpt, device="cpu").sample(5, seed=2, batch_size=4)
    assert np.array_equal(stored["samples"], expected.to_uint8().numpy())
    assert np.array_equal(stored["labels"], expected.labels.numpy())


def test_export_command_writes_the_model_hub_layout(runs, tmp_path, run_command):
    ckpt = runs["eps"][0]
    out = tmp_path / "digits-eps"
    r = run_command("diffusion_lab.export", [f"ckpt={ckpt}", f"out={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "diffusion_lab" and meta["format_version"] == 1
    assert meta["image_shape"] == [1, 8, 8] and meta["num_classes"] == 10 and meta["weights"] == "ema"
    assert meta["global_step"] == 6 and meta["config"]["objective"]["parameterization"] == "eps"
    assert not {"trainer", "callbacks", "logger", "paths", "hydra"} & set(meta["config"])

    card = (out / "README.md").read_text()
    front, body = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.S).groups()
    front = yaml.safe_load(front)
    assert front["library_name"] == "diffusion_lab" and {"diffusion", "ddpm"} <= set(front["tags"])
    assert front["pipeline_tag"] == "unconditional-image-generation"
    assert "digits" in body and "eps prediction, linear schedule, T = 50" in body and "MLP" in body
    assert "`ddim`: steps=5" in body  # the run's sampler
    assert re.search(r"\| val/loss \| [0-9.]+ \| validation during training, step 5 \|", body), body

    weights = load_file(str(out / "model.safetensors"))
    state = diffusion_lab.load(ckpt, device="cpu").module.state_dict()
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], state[k]) for k in state)

    again = run_command("diffusion_lab.export", [f"ckpt={ckpt}", f"out={out}"], tmp_path)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    (line,) = again.stderr.strip().splitlines()
    assert line == f"error: out={out} already holds an export ({', '.join(EXPORTED)}): add overwrite=true"
    assert (
        run_command(
            "diffusion_lab.export", [f"ckpt={ckpt}", f"out={out}", "overwrite=true"], tmp_path
        ).returncode
        == 0
    )


def test_card_says_not_measured_without_the_runs_logs(runs, tmp_path):
    alone = tmp_path / "alone.ckpt"
    shutil.copy(runs["flow"][0], alone)
    card = (export(alone, tmp_path / "out") / "README.md").read_text()
    assert (
        "## Metrics\n\nnot measured" in card and "flow matching / stochastic interpolant: linear path" in card
    )


# ------------------------------------------------------------------------------------------ tampering


def _tampered(folder: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(folder, out)
    meta = json.loads((out / "config.json").read_text())
    if name == "os_system_target":
        meta["config"]["model"] = {"_target_": "os.system", "_args_": [f"touch {tmp_path / 'PWNED'}"]}
    elif name == "nested_target":
        meta["config"]["objective"]["time_density"] = {
            "_target_": "builtins.open",
            "file": str(tmp_path / "x"),
        }
    elif name == "wrong_image_shape":
        meta["image_shape"] = [1, 16, 16]
    elif name == "bad_image_shape":
        meta["image_shape"] = [1, 8]
    elif name == "format_version":
        meta["format_version"] = 99
    elif name == "interpolation":
        meta["config"]["seed"] = "${oc.env:HOME}"
    elif name == "wrong_weight_shape":
        weights = load_file(str(out / "model.safetensors"))
        weights["model.inp.weight"] = torch.zeros(3, 3)
        save_file(weights, str(out / "model.safetensors"))
    elif name == "missing_weight":
        weights = load_file(str(out / "model.safetensors"))
        del weights["model.out.bias"]
        save_file(weights, str(out / "model.safetensors"))
    elif name == "not_safetensors":
        (out / "model.safetensors").write_bytes(pickle.dumps({"model.inp.weight": [1, 2]}))
    (out / "config.json").write_text(json.dumps(meta))
    return out


REFUSED = {
    "os_system_target": "model._target_='os.system' refused",
    "nested_target": "objective.time_density._target_='builtins.open' refused",
    "wrong_image_shape": "image_shape=[1, 16, 16] disagrees with its config",
    "bad_image_shape": "image_shape=[1, 8] is not valid",
    "format_version": "format_version 99 is not one this diffusion_lab reads",
    "interpolation": "config.seed holds an interpolation",
    "wrong_weight_shape": "model.inp.weight has shape [3, 3], the model's [64, 64]",
    "missing_weight": "model.out.bias is missing",
    "not_safetensors": "is not a readable safetensors file",
}
BUILT_FIRST = {
    "wrong_weight_shape",
    "missing_weight",
    "not_safetensors",
}  # the config is fine: the model is built


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_tampered_folder_is_refused_in_one_line(runs, tmp_path, monkeypatch, no_pickle, name):
    folder = _tampered(runs["eps"][1], tmp_path, name)
    import diffusion_lab.training.build as build

    if name not in BUILT_FIRST:  # nothing of the config is instantiated
        monkeypatch.setattr(build, "build_module", lambda *a, **k: pytest.fail("built a tampered config"))
    with pytest.raises(ValueError) as excinfo:
        diffusion_lab.load(folder, device="cpu")
    assert REFUSED[name] in _one_line_error(excinfo)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "x").exists()


def test_the_sample_command_refuses_a_tampered_folder_in_one_line(runs, tmp_path, run_command):
    folder = _tampered(runs["eps"][1], tmp_path, "os_system_target")
    r = run_command("diffusion_lab.sample", [f"ckpt={folder}", "n=2", f"out={tmp_path / 's'}"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        f"error: exported model {folder}: model._target_='os.system'"
    )
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ the README


def _section(readme: str, title: str) -> str:
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end > 0 else None]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_readme_python_api_and_export_examples_run_as_written(tmp_path, run_command, run_commands):
    """The README's "Python API" example (it trains, loads and samples), then its "Export" command on that
    run and its "Export" example, each as written, in a fresh folder (the last two in one process)."""
    readme = (REPO / "README.md").read_text()
    api, exported = _section(readme, "Python API"), _section(readme, "Export")
    (api_code,) = _blocks(api, "python")
    (command,) = _blocks(exported, "bash")
    (load_code,) = _blocks(exported, "python")

    (tmp_path / "example_api.py").write_text(api_code)
    r = run_command(str(tmp_path / "example_api.py"), [], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (tmp_path / "sample0.png").is_file() and "Pipeline(" in r.stdout
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()

    argv = shlex.split(command.strip().replace("<run>", run.name))
    assert argv[:3] == ["python", "-m", "diffusion_lab.export"]
    (tmp_path / "example_export.py").write_text(load_code)
    r_export, r_load = run_commands(
        [("diffusion_lab.export", argv[3:]), (str(tmp_path / "example_export.py"), [])], tmp_path
    )
    assert r_export.returncode == 0, r_export.stderr[-3000:]
    assert r_load.returncode == 0, r_load.stderr[-3000:]
    assert (tmp_path / "exports" / "digits-mlp" / "model.safetensors").is_file()
