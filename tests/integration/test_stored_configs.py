"""A stored run config instantiates only what the configs under conf/ name (or what the user admitted).

A checkpoint's run config comes from whoever wrote the file; every ``_target_`` in it is checked against an
exact allow-list before anything of it is instantiated. Each hostile case leaves nothing on disk and fetches
nothing; every config and preset of conf/ still passes when stored.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_command
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.train import CONF_DIR
from diffusion_lab.training.build import build_module
from diffusion_lab.training.checkpoint import load_module
from diffusion_lab.utils import safe_config
from diffusion_lab.utils.safe_config import (
    ENV_VAR,
    LAUNCH_TIME_KEYS,
    allow_targets,
    check_stored_config,
    check_targets,
    conf_targets,
)

DOWNLOAD = "diffusion_lab.data.download.download_file"


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def payload_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``payload.sh``; yields (its URL, the list of requested paths)."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "payload.sh").write_text("echo owned\n")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/payload.sh", requests
    finally:
        server.shutdown()
        server.server_close()


def _with_config(ckpt_path: Path, out: Path, **entries) -> Path:
    """A copy of a checkpoint whose stored run config has ``entries`` replaced (plain containers only)."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["hyper_parameters"]["config"].update(entries)
    torch.save(ckpt, out)
    return out


@pytest.fixture
def no_admitted(monkeypatch):
    """No user-admitted targets, before and after the test."""
    monkeypatch.setattr(safe_config, "_admitted", set())
    monkeypatch.delenv(ENV_VAR, raising=False)


# ------------------------------------------------------------------------------ the download


def test_download_from_a_stored_config_is_refused_and_fetches_nothing(
    tiny_checkpoint, tmp_path, payload_server, no_admitted
):
    url, requests = payload_server
    dest = tmp_path / "home" / ".bashrc"
    evil = {"_target_": DOWNLOAD, "urls": [url], "dest": str(dest)}
    bad = _with_config(tiny_checkpoint, tmp_path / "bad.ckpt", schedule=evil)

    r = run_command("diffusion_lab.sample", [f"ckpt={bad}", "n=2", f"out={tmp_path / 's'}"], tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith(f"error: checkpoint {bad}: schedule._target_='{DOWNLOAD}' refused")
    assert not dest.exists() and not dest.parent.exists(), "nothing written"
    assert not (tmp_path / "s").exists()
    assert requests == [], "nothing fetched"

    # the same config, instantiated without the check, does fetch and write: the case is real
    instantiate(OmegaConf.create({**evil, "dest": str(tmp_path / "unchecked")}))
    assert (tmp_path / "unchecked").read_text() == "echo owned\n" and len(requests) == 1


# ------------------------------------------------------------------- other ways to reach a call


def _open_call(marker: Path) -> dict:
    return {"_target_": "builtins.open", "_args_": [str(marker), "w"]}


@pytest.mark.parametrize(
    ("key", "make", "refused"),
    [
        # a file writer of this project
        (
            "model",
            lambda m: {"_target_": "diffusion_lab.utils.fileio.atomic_write", "path": str(m), "write": None},
            "model._target_='diffusion_lab.utils.fileio.atomic_write'",
        ),
        # Lightning utilities
        (
            "optimizer",
            lambda m: {
                "_target_": "lightning.fabric.utilities.cloud_io._atomic_save",
                "checkpoint": {},
                "filepath": str(m),
            },
            "optimizer._target_='lightning.fabric.utilities.cloud_io._atomic_save'",
        ),
        (
            "sampler",
            lambda m: {"_target_": "lightning.pytorch.utilities.rank_zero_only", "fn": None},
            "sampler._target_='lightning.pytorch.utilities.rank_zero_only'",
        ),
        # a launch-time class (writes checkpoints where dirpath says) in a part that commands build
        (
            "schedule",
            lambda m: {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "dirpath": str(m)},
            "schedule._target_='lightning.pytorch.callbacks.ModelCheckpoint'",
        ),
        # _partial_: a partial of the download, called later
        (
            "sampler",
            lambda m: {
                "_target_": DOWNLOAD,
                "_partial_": True,
                "urls": ["http://127.0.0.1:9/x"],
                "dest": str(m),
            },
            f"sampler._target_='{DOWNLOAD}'",
        ),
        # a call inside _args_ of an allowed target, with and without _recursive_
        (
            "model",
            lambda m: {"_target_": "diffusion_lab.models.MLP", "_args_": [[_open_call(m)]]},
            "model._args_[0][0]._target_='builtins.open'",
        ),
        (
            "model",
            lambda m: {"_target_": "diffusion_lab.models.MLP", "_recursive_": False, "hidden": _open_call(m)},
            "model.hidden._target_='builtins.open'",
        ),
        # a target that is not a string
        ("schedule", lambda m: {"_target_": ["builtins", "open"], "file": str(m)}, "schedule._target_=["),
        # a key no command knows yet is checked too
        ("guide", lambda m: _open_call(m), "guide._target_='builtins.open'"),
    ],
)
def test_stored_call_is_refused(tiny_checkpoint, tmp_path, no_admitted, key, make, refused):
    marker = tmp_path / "written"
    bad = _with_config(tiny_checkpoint, tmp_path / "bad.ckpt", **{key: make(marker)})
    with pytest.raises(ValueError, match=rf"^checkpoint {bad}: {_escape(refused)}.* refused"):
        load_module(bad)
    assert not marker.exists()


def _escape(s: str) -> str:
    import re

    return re.escape(s)


def test_launch_time_parts_are_not_checked_and_never_built(tiny_checkpoint, tmp_path, no_admitted):
    """Trainer, callbacks and loggers of a stored config are the run's record, not built by any command:
    a custom callback of the training run does not stop its checkpoint from sampling."""
    marker = tmp_path / "written"
    ok = _with_config(tiny_checkpoint, tmp_path / "ok.ckpt", callbacks={"mine": _open_call(marker)})
    module, cfg, _ = load_module(ok)
    assert cfg.callbacks.mine._target_ == "builtins.open" and not marker.exists()
    assert {"trainer", "callbacks", "logger"} <= LAUNCH_TIME_KEYS


# --------------------------------------------------------------------------------- admitting one's own


def test_user_admits_own_class_by_code_or_environment(tiny_checkpoint, tmp_path, no_admitted):
    own = "diffusion_lab.models.mlp.MLP"  # the MLP by its module path: a name no file of conf/ uses
    stored = torch.load(tiny_checkpoint, weights_only=True)["hyper_parameters"]["config"]["model"]
    ckpt = _with_config(tiny_checkpoint, tmp_path / "own.ckpt", model={**stored, "_target_": own})
    with pytest.raises(ValueError, match=rf"model\._target_='{own}' refused.*{ENV_VAR}={own}"):
        load_module(ckpt)

    out = tmp_path / "s"
    args = [f"ckpt={ckpt}", "n=2", "sampler.steps=2", f"out={out}"]
    r = run_command("diffusion_lab.sample", args, tmp_path, env={ENV_VAR: f"mypkg.Other, {own}"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "samples.npz").is_file()

    allow_targets(own)
    module, cfg, _ = load_module(ckpt)
    assert type(module.model).__module__ == "diffusion_lab.models.mlp"
    with pytest.raises(ValueError, match="is not a dotted name"):
        allow_targets("open")


def test_a_config_cannot_admit_targets(tiny_checkpoint, tmp_path, no_admitted):
    """The allow-list is read from the code and the environment only, never from the stored config."""
    marker = tmp_path / "written"
    bad = _with_config(
        tiny_checkpoint,
        tmp_path / "bad.ckpt",
        DIFFUSION_LAB_ALLOWED_TARGETS="builtins.open",
        allowed_targets=["builtins.open"],
        schedule=_open_call(marker),
    )
    with pytest.raises(ValueError, match=r"schedule\._target_='builtins\.open' refused"):
        load_module(bad)
    assert not marker.exists()


# ----------------------------------------------------------------------------- the list itself


def test_conf_targets_are_importable_and_write_nothing():
    from hydra.utils import get_object

    targets = conf_targets()
    assert {
        "diffusion_lab.models.UNet",
        "torch.optim.AdamW",
        "diffusion_lab.data.DiffusionDataModule",
    } <= targets
    assert not any(t.startswith("lightning.pytorch.") for t in targets), "launch-time classes are left out"
    writers = ("fileio", "download", "checkpoint_io", "run_lock", "cache", "media", "cloud_io", "builtins")
    for t in targets:
        obj = get_object(t)
        assert not any(w in obj.__module__.split(".") for w in writers), f"{t} lives in a file-writing module"
        assert not any(w in t.lower() for w in ("save", "write", "download", "remove", "delete")), t


def test_conf_scan_follows_packages_and_leaves_out_launch_time_and_writers(tmp_path):
    conf = tmp_path / "conf"
    for d in ("model", "experiment", "trainer", "hydra/launcher", "schedule"):
        (conf / d).mkdir(parents=True)
    (conf / "model" / "net.yaml").write_text("_target_: mypkg.Net\nblock:\n  _target_: mypkg.Block\n")
    (conf / "experiment" / "x.yaml").write_text(
        "# @package _global_\nmodel:\n  _target_: mypkg.Preset\ntrainer:\n  _target_: mypkg.Trainer\n"
    )
    (conf / "trainer" / "t.yaml").write_text("_target_: mypkg.GroupTrainer\n")
    (conf / "hydra" / "launcher" / "l.yaml").write_text("_target_: mypkg.Launcher\n")
    (conf / "schedule" / "evil.yaml").write_text(f"_target_: {DOWNLOAD}\nnested:\n  - _target_: os.remove\n")
    assert conf_targets(conf) == {"mypkg.Net", "mypkg.Block", "mypkg.Preset"}


# ------------------------------------------------------------------- every config and preset of conf/


def _options() -> list[list[str]]:
    """One override list per option of each config group that a stored config carries, and per preset."""
    cases = []
    for group in sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir()):
        if group.name in ("hydra", "hparams_search", "paths"):
            continue  # launch-time only (and hparams_search needs the Optuna plugin to compose)
        for option in sorted(group.glob("*.yaml")):
            override = {"metric_suite": "metric_suite@metrics"}.get(group.name, group.name)
            cases.append([f"{override}={option.stem}"])
    return cases


def test_every_config_and_preset_passes_when_stored(tmp_path, no_admitted):
    """Compose each option of each group and each preset, store its resolved config as training does, check
    it; the MLP one is also built from the stored config (the full round trip below trains one)."""
    cases = _options()
    assert any(c[0].startswith("experiment=") for c in cases) and len(cases) > 30
    for overrides in cases:
        cfg = compose_config(tmp_path, [*overrides, "dataset.root=/nonexistent"])
        stored = OmegaConf.to_container(cfg, resolve=True)
        check_stored_config(stored, source=" ".join(overrides))
        for key in ("schedule", "objective", "model", "optimizer", "sampler", "dataset"):
            check_targets(stored.get(key), key)
    cfg = compose_config(tmp_path, ["model=mlp"])
    module, _ = build_module(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), (1, 8, 8), 10)
    assert type(module.model).__name__ == "MLP"


def test_trained_checkpoint_loads_and_samples(tiny_checkpoint, tmp_path, no_admitted):
    out = tmp_path / "s"
    # the stored default sampler (ancestral, 100 steps) is respaced to 10 of the tiny run's T = 50 steps
    args = [f"ckpt={tiny_checkpoint}", "n=2", "sampler.steps=10", f"out={out}"]
    r = run_command("diffusion_lab.sample", args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "samples.npz").is_file()
    assert os.path.getsize(out / "samples.npz") > 0
