"""``sample`` and ``evaluate`` follow the checkpoint: its sampler config, its data, and a GPU trainer is
refused in one line where no GPU is usable.

One tiny run (8x8 digits, MLP, 3 steps, T = 50) trained with ``sampler=ddim sampler.steps=7
sampler.eta=0.5`` (stochastic DDIM, so the seed matters); everything else runs in this process except one
``sample`` and one ``train.py`` subprocess (the command-line rewriting and the Hydra callback).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.train import CONF_DIR

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "pre_layout_mlp8.ckpt"
DDIM7 = ["sampler=ddim", "sampler.steps=7", "sampler.eta=0.5"]


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides)


def _sample(overrides: list[str], out: Path) -> np.ndarray:
    """The sample command's work in this process; its samples."""
    from diffusion_lab.sample import _sample as sample

    sample(_compose("sample", [*overrides, "n=6", "seed=3", f"out={out}"]))
    return np.load(out / "samples.npz")["samples"]


@pytest.fixture(scope="module")
def ddim_checkpoint(tmp_path_factory) -> Path:
    """A 3-step run whose sampler config is stochastic DDIM, 7 steps."""
    from diffusion_lab.train import train

    root = tmp_path_factory.mktemp("ddim_ckpt")
    cfg = compose_config(
        root,
        FAST
        + DDIM7
        + [
            "callbacks=default",
            "callbacks.sample_grid=null",
            "callbacks.progress_bar=null",
            "callbacks.model_checkpoint.every_n_train_steps=3",
        ],
    )
    return Path(train(cfg)["last_checkpoint"])


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose stored run config ``edit`` changed in place."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt["hyper_parameters"]["config"])
    torch.save(ckpt, dst)
    return dst


# ---------------------------------------------------------------------------- 1. the checkpoint's sampler


def test_sample_uses_the_checkpoint_sampler_by_default(ddim_checkpoint, tmp_path, capsys):
    ck = f"ckpt={ddim_checkpoint}"
    default = _sample([ck], tmp_path / "default")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sampler: ddim (the checkpoint's): steps=7 "), lines[0]
    assert "eta=0.5" in lines[0]
    assert "7 network evaluations" in lines[-1]
    explicit = _sample([ck, *DDIM7], tmp_path / "explicit")
    assert "chosen with sampler= on the command line" in capsys.readouterr().out
    assert np.array_equal(default, explicit), "the default is the checkpoint's sampler, seed for seed"
    ddpm = _sample([ck, "sampler=ddpm"], tmp_path / "ddpm")
    assert "50 network evaluations" in capsys.readouterr().out
    assert not np.array_equal(default, ddpm), "sampler=ddpm overrides the checkpoint's sampler"


def test_partial_override_changes_one_key_of_the_checkpoint_sampler(ddim_checkpoint, tmp_path, run_command):
    """``sampler.steps=4`` on the command line (no ``sampler=``): stochastic DDIM (eta 0.5 kept), 4 steps."""
    out = tmp_path / "partial"
    r = run_command(
        "diffusion_lab.sample",
        [f"ckpt={ddim_checkpoint}", "sampler.steps=4", "n=6", "seed=3", f"out={out}"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("sampler: ddim (the checkpoint's, with sampler.steps from the command line)"), (
        first
    )
    assert "steps=4 " in first and "eta=0.5" in first
    explicit = _sample([f"ckpt={ddim_checkpoint}", *DDIM7, "sampler.steps=4"], tmp_path / "explicit")
    assert np.array_equal(np.load(out / "samples.npz")["samples"], explicit)


def test_partial_override_of_an_option_the_sampler_lacks(ddim_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"sampler\.S_churn is not an option of the ddim sampler"):
        _sample([f"ckpt={ddim_checkpoint}", "++sampler.S_churn=2"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_old_checkpoint_without_a_sampler_falls_back_to_the_default(tmp_path, capsys):
    old = _rewrite(OLD, tmp_path / "old.ckpt", lambda c: c.pop("sampler"))
    fallback = _sample([f"ckpt={old}"], tmp_path / "fallback")
    first = capsys.readouterr().out.splitlines()[0]
    assert "this checkpoint stores no sampler config: the default sampler=ddpm" in first, first
    assert np.array_equal(fallback, _sample([f"ckpt={old}", "sampler=ddpm"], tmp_path / "ddpm"))
    partial = _sample([f"ckpt={old}", "++sampler.steps=5"], tmp_path / "partial")
    assert "50 network evaluations" not in capsys.readouterr().out.splitlines()[-1]
    assert np.array_equal(
        partial, _sample([f"ckpt={old}", "sampler=ddpm", "sampler.steps=5"], tmp_path / "p5")
    )


def test_the_stored_sampler_passes_the_target_check(tmp_path):
    def evil(c):
        c["sampler"]["_target_"] = "builtins.print"

    bad = _rewrite(OLD, tmp_path / "evil.ckpt", evil)
    with pytest.raises(ValueError, match=r"sampler\._target_='builtins\.print' refused"):
        _sample([f"ckpt={bad}"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_evaluate_reports_the_sampler_it_used(ddim_checkpoint, digits_classifier, tmp_path, capsys):
    from diffusion_lab.evaluate import evaluate

    base = [f"ckpt={ddim_checkpoint}", "metric_names=[fid_classifier]", "n=8", "n_real=16", "batch_size=8"]
    base.append(f"classifier_path={digits_classifier}")
    res = evaluate(_compose("evaluate", base))
    assert capsys.readouterr().out.startswith("sampler: ddim (the checkpoint's): steps=7 ")
    assert (res["sampler"], res["sampler_source"], res["nfe"], res["sampler_steps"]) == (
        "ddim",
        "checkpoint",
        7,
        7,
    )
    assert res["sampler_config"]["eta"] == 0.5
    res = evaluate(_compose("evaluate", [*base, "sampler=dpm_solver", "sampler.steps=3"]))
    assert (res["sampler"], res["sampler_source"], res["nfe"]) == ("dpm_solver", "command line", 3)


# ------------------------------------------------------------------------------- 2. the checkpoint's data


def test_evaluate_refuses_a_stored_data_root_that_is_not_here(tmp_path, monkeypatch):
    import diffusion_lab.evaluate as ev

    gone = tmp_path / "trainer_machine" / "hoda"

    def persian(c):
        c["dataset"].update(name="persian", root=str(gone), split="auto", download=True)

    ck = _rewrite(OLD, tmp_path / "persian.ckpt", persian)
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("sampled before the data check"))
    monkeypatch.delenv("DIFFUSION_LAB_SHARED_DATA", raising=False)
    cfg = ["metric_names=[fid_classifier]", "n=4"]
    with pytest.raises(FileNotFoundError) as e:
        ev.evaluate(_compose("evaluate", [f"ckpt={ck}", *cfg]))
    msg = str(e.value)
    assert f"lived at {gone} (its stored dataset.root), which does not exist here" in msg
    assert msg.endswith("data_root=PATH") and "\n" not in msg
    assert not gone.exists(), "nothing downloaded into the stored path"

    shared = tmp_path / "shared"
    (shared / "hoda").mkdir(parents=True)
    (shared / "hoda" / "Test 20000.cdb").write_bytes(b"")
    monkeypatch.setenv("DIFFUSION_LAB_SHARED_DATA", str(shared))
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"(the shared data holds it: data_root={shared / 'hoda'})") + "$"
    ):
        ev.evaluate(_compose("evaluate", [f"ckpt={ck}", *cfg]))
    with pytest.raises(FileNotFoundError, match=r"data_root=.*elsewhere does not exist"):
        ev.evaluate(_compose("evaluate", [f"ckpt={ck}", *cfg, f"data_root={tmp_path / 'elsewhere'}"]))


# ------------------------------------------------------------------------------------ 3. no usable GPU


def test_gpu_trainer_without_a_gpu_is_one_line_and_writes_nothing(tmp_path, run_command):
    log_dir = tmp_path / "logs"
    r = run_command(
        "train.py",
        [*FAST, "trainer=ddp", f"paths.log_dir={log_dir}", f"paths.cache_dir={tmp_path}/cache"],
        tmp_path,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error: trainer=ddp trains on a GPU, but no usable GPU is here (")
    assert lines[0].endswith("): use trainer=ddp_cpu (data-parallel CPU processes)")
    assert not log_dir.exists(), "no run directory for a refused run"


def test_gpu_trainer_without_a_gpu_in_process(tmp_path, monkeypatch):
    from diffusion_lab.train import train
    from diffusion_lab.training.device_check import NoUsableGPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = compose_config(tmp_path, [*FAST, "trainer=gpu"])
    with pytest.raises(NoUsableGPU, match=r"no usable GPU is here .*: use trainer=cpu$"):
        train(cfg)
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = compose_config(tmp_path, [*FAST, "trainer=ddp", "trainer.devices=4"])
    with pytest.raises(
        NoUsableGPU, match=r"trainer.devices=4 GPUs but this machine has 1: set trainer.devices=1"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_sample_on_cuda_without_a_gpu(ddim_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device=cuda but no CUDA device is available here: use device=cpu"):
        _sample([f"ckpt={ddim_checkpoint}", "device=cuda"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
