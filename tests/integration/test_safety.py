"""Safe by default: what a hostile but fair user meets on the command line.

Untrusted checkpoints never run code, a non-finite loss stops (or skips) without touching the last finite
checkpoint, a full disk is one line and keeps the previous file, a run directory holds one run, corrupt
cache entries are rebuilt, files follow the umask, bad input is one line, guidance comes from the sampler.

Each case runs the real commands in subprocesses (several at once where they are independent) and checks
the exit code, that no traceback is shown, the first line of the message, and what is left on disk.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, REPO, compose_config

CKPT = ["callbacks=default", "callbacks.sample_grid=null", "callbacks.progress_bar=null"]


# ------------------------------------------------------------------------------------------- helpers


def _start(command: str, args: list[str], cwd: Path, umask: int | None = None, fsize: int | None = None):
    """Start ``python train.py ARGS`` or ``python -m COMMAND ARGS`` (as conftest's run_command does), with
    an optional umask and file-size limit (SIGXFSZ ignored, so a write past it fails with EFBIG)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.pop("HYDRA_FULL_ERROR", None)

    def limits() -> None:
        if umask is not None:
            os.umask(umask)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    target = [str(REPO / command)] if command.endswith(".py") else ["-m", command]
    return subprocess.Popen(
        [sys.executable, *target, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limits,
    )


def _run_all(cases: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands at once: {name: (command, args, cwd[, start kwargs])} -> results."""
    procs = {name: _start(*case[:3], **(case[3] if len(case) > 3 else {})) for name, case in cases.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return results


def _run(command: str, args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return _run_all({"one": (command, args, cwd, kw)})["one"]


def _error_line(r: subprocess.CompletedProcess, starts: str, name: str = "") -> str:
    """Exit 1, no traceback, exactly one ``error:`` line, starting with ``error: <starts>``."""
    shown = r.stdout + r.stderr
    assert r.returncode == 1, f"{name}: exit {r.returncode}\n{shown[-3000:]}"
    assert "Traceback" not in shown, f"{name}: a traceback\n{shown[-3000:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {starts}"), f"{name}:\n{r.stderr[-3000:]}"
    return errors[0]


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffusion_lab.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides)


def _evaluate(overrides: list[str]) -> dict:
    """``evaluate(cfg)`` in this process, the config composed from conf/evaluate.yaml."""
    from diffusion_lab.evaluate import evaluate

    return evaluate(_compose("evaluate", overrides))


def _sample(overrides: list[str]) -> None:
    """The sample command's work in this process, the config composed from conf/sample.yaml."""
    from diffusion_lab.sample import _sample as sample

    sample(_compose("sample", overrides))


def _train_args(root: Path, *extra: str) -> list[str]:
    return [*FAST, f"paths.log_dir={root}", f"paths.cache_dir={root}/cache", *extra]


def _finite(ckpt: dict) -> bool:
    tensors = list(ckpt["state_dict"].values()) + list(ckpt["current_model_state"].values())
    for state in ckpt["optimizer_states"][0]["state"].values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


class _Payload:
    """Unpickling it calls open(marker, "w"): it creates a file, as an attacker's payload would."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------ 1. untrusted checkpoints


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_run(tiny_checkpoint, tmp_path):
    marker = tmp_path / "payload_ran"
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["rng_states"]["extra"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    found = tmp_path / "logs" / "train" / "runs" / "2020-01-01_00-00-00-000000" / "checkpoints" / "last.ckpt"
    found.parent.mkdir(parents=True)
    shutil.copy(evil, found)
    results = _run_all(
        {
            "sample": ("diffusion_lab.sample", [f"ckpt={evil}", "n=2", f"out={tmp_path / 's'}"], tmp_path),
            "resume file": ("train.py", _train_args(tmp_path / "logs", f"ckpt_path={evil}"), tmp_path),
            "resume last": ("train.py", _train_args(tmp_path / "logs", "ckpt_path=last"), tmp_path),
        }
    )
    for name, r in results.items():
        path = found if name == "resume last" else evil
        line = _error_line(r, f"checkpoint {path} refused: it holds pickled objects", name)
        assert "io.open" in line  # builtins.open pickles as io.open
    with pytest.raises(ValueError, match=f"checkpoint {evil} refused: it holds pickled objects"):
        _evaluate([f"ckpt={evil}", "n=2"])  # evaluate loads through the same function as sample
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "s").exists()


def test_lightning_resume_load_is_weights_only(tiny_checkpoint, tmp_path):
    """The load behind trainer.fit(ckpt_path=...) is safe by itself, not only because train() checks first."""
    from diffusion_lab.training.checkpoint import UnsafeCheckpointError
    from diffusion_lab.training.checkpoint_io import AtomicCheckpointIO

    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refused: it holds pickled objects"):
        AtomicCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()
    assert AtomicCheckpointIO().load_checkpoint(tiny_checkpoint)["global_step"] == 30


def test_stored_config_target_outside_the_project_is_refused(tiny_checkpoint, tmp_path):
    marker = tmp_path / "truncated_by_open"
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["config"]["schedule"] = {
        "_target_": "builtins.open",
        "file": str(marker),
        "mode": "w",
    }
    bad = tmp_path / "bad_target.ckpt"
    torch.save(ckpt, bad)  # plain containers only: weights_only loads it
    r = _run("diffusion_lab.sample", [f"ckpt={bad}", "n=2", f"out={tmp_path / 's'}"], tmp_path)
    _error_line(r, f"checkpoint {bad}: schedule._target_='builtins.open' refused")
    with pytest.raises(ValueError, match=r"schedule\._target_='builtins\.open' refused"):
        _evaluate([f"ckpt={bad}", "n=2"])  # evaluate reads the checkpoint through the same check
    assert not marker.exists()


# ------------------------------------------------------------------------------------ 2. NaN and inf


def test_non_finite_loss_stops_and_keeps_the_last_finite_checkpoint(tmp_path):
    args = _train_args(
        tmp_path,
        *CKPT,
        "optimizer.lr=1e6",
        "trainer.max_steps=10",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    results = _run_all(
        {
            "stop": ("train.py", args, tmp_path),
            "skip": (
                "train.py",
                [*args, f"paths.log_dir={tmp_path / 'k'}", "nan_policy=skip", "trainer.log_every_n_steps=1"],
                tmp_path,
            ),
        }
    )
    line = _error_line(results["stop"], "non-finite loss at step ", "stop")
    step = int(line.split("at step ")[1].split()[0])
    assert "nan_policy=skip" in line
    (last,) = (tmp_path / "train" / "runs").glob("*/checkpoints/last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] <= step and _finite(ckpt), "last.ckpt holds the last finite weights"

    skip = results["skip"]
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert "Traceback" not in skip.stderr
    (run,) = (tmp_path / "k" / "train" / "runs").glob("*")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10 and _finite(ckpt)
    header, *rows = (run / "csv" / "metrics.csv").read_text().splitlines()
    col = header.split(",").index("train/skipped_steps")
    counts = [float(r.split(",")[col]) for r in rows if r.split(",")[col]]
    assert counts and 0 < counts[-1] <= 10, "the skipped steps are counted and logged"


def test_non_finite_gradient_is_named(make_cfg, monkeypatch):
    """A finite loss with a NaN gradient: the parameter is named."""
    from diffusion_lab.train import train
    from diffusion_lab.training.guards import NonFiniteError
    from diffusion_lab.training.lit_module import DiffusionModule

    def poison(self):  # after backward, before the optimizer step
        next(self.model.parameters()).grad.fill_(float("nan"))

    monkeypatch.setattr(DiffusionModule, "on_after_backward", poison, raising=False)
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient \(model\.[\w.]+\) at step 0;"):
        train(make_cfg())


@pytest.mark.parametrize(
    ("bad_calls", "limit", "stops_at"),
    [
        (set(range(100)), 3, 2),  # every step: the 3rd in a row stops the run
        ({0, 1, 3, 4, 6, 7}, 3, None),  # two in a row, then a finite step: the count starts again
        (set(range(100)), None, None),  # no limit: skipped to the end
    ],
)
def test_skipping_stops_after_nan_skip_limit_steps_in_a_row(
    make_cfg, monkeypatch, bad_calls, limit, stops_at
):
    from diffusion_lab.train import train
    from diffusion_lab.training.guards import NonFiniteError, NonFiniteGuard
    from diffusion_lab.training.lit_module import DiffusionModule

    calls = []

    def poison(self):
        if len(calls) in bad_calls:
            next(self.model.parameters()).grad.fill_(float("nan"))
        calls.append(self.global_step)

    monkeypatch.setattr(DiffusionModule, "on_after_backward", poison, raising=False)
    cfg = make_cfg(
        "nan_policy=skip", f"nan_skip_limit={'null' if limit is None else limit}", "trainer.max_steps=8"
    )
    if stops_at is None:
        train(cfg)
        assert len(calls) == 8, "every step ran"
        return
    pattern = rf"^non-finite gradient \(model\.[\w.]+\) at step {stops_at}; "
    pattern += rf"{limit} steps in a row skipped \(nan_skip_limit={limit}\): the run has diverged"
    with pytest.raises(NonFiniteError, match=pattern):
        train(cfg)
    # the verdict is read back at the next logging step or checkpoint save: here the checkpoint written after
    # the validation at step 3 (FAST: val_check_interval=3), right after the step that reached the limit
    assert len(calls) == stops_at + 1
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="nan_skip_limit=.* is not valid"):
            NonFiniteGuard("skip", bad)


# ------------------------------------------------------------------------------------ 3. full disks


def test_file_size_limit_on_checkpoints_and_on_the_cache(tmp_path):
    run = tmp_path / "run"
    ckpt_args = [
        *CKPT,
        "callbacks.best_checkpoint=null",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.max_steps=6",
        f"hydra.run.dir={run}",
        # from step 3 no file may grow past 512 kB: last.ckpt of step 2 (1.1 MB) is written, step 4's is not
        "+callbacks.full._target_=disk_full_callback.FileSizeLimitAt",
        "+callbacks.full.step=3",
        f"+callbacks.full.limit={512 << 10}",
    ]
    results = _run_all(
        {
            "checkpoint": ("train.py", _train_args(tmp_path, *ckpt_args), tmp_path),
            "cache": (
                "train.py",
                _train_args(tmp_path / "c", "+trainer.enable_checkpointing=false"),
                tmp_path,
                {"fsize": 64 << 10},
            ),
        }
    )
    last = run / "checkpoints" / "last.ckpt"
    line = _error_line(results["checkpoint"], f"file too large writing {last}: needs ", "checkpoint")
    assert "file-size limit of 524,288 bytes" in line and "the previous file is kept" in line
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2 and _finite(ckpt), "the previous checkpoint is intact"
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"], "no partial temporary file"

    cache = results["cache"]
    assert cache.returncode == 0 and "Traceback" not in cache.stderr, cache.stderr[-3000:]
    warned = [line for line in (cache.stdout + cache.stderr).splitlines() if "data cache not written" in line]
    assert len(warned) == 1 and "file too large writing" in warned[0], "warned once"
    left = [p.name for p in (tmp_path / "c" / "cache").iterdir() if not p.name.endswith(".lock")]
    assert left == [], "no cache entry, no partial file"
    assert list((tmp_path / "c" / "train" / "runs").glob("*/result.yaml")), "training went on and finished"


# ------------------------------------------------------- 4. run directories, stale files, 5. cache, 6. modes


def test_second_run_in_a_run_directory_is_refused(tmp_path):
    from diffusion_lab.training.run_lock import lock_run_dir, release_run_dir

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("first run\n")
    assert lock_run_dir(run)  # this process is the first run
    try:
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        r = _run("train.py", _train_args(tmp_path, f"hydra.run.dir={run}"), tmp_path)
        _error_line(r, f"run directory {run} is in use by PID {os.getpid()} on ")
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, (
            "nothing written by the second run"
        )
        assert (run / ".hydra" / "config.yaml").read_text() == "first run\n"
    finally:
        release_run_dir(run)


def test_next_start_after_a_kill_cleans_up_and_rebuilds_a_corrupt_cache(tiny_checkpoint, tmp_path):
    """A run killed mid-write leaves its lock file and a partial checkpoint; a cache entry got corrupted.
    The next start (a resume) takes the stale lock over, removes the partial file, rebuilds the entry; new
    files are group-writable under umask 002."""
    from diffusion_lab.data import DiffusionDataModule

    prev = tmp_path / "prev" / "checkpoints"
    prev.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, prev / "last.ckpt")
    partial = prev / ".last.ckpt.0badf00d.tmp"
    partial.write_bytes(b"half a checkpoint")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text("PID 2147483646 on elsewhere (since 2020-01-01 00:00:00)")
    cache = tmp_path / "cache"
    DiffusionDataModule(name="digits", image_size=8, cache_dir=cache).prepare_data()
    (entry_path,) = cache.glob("digits-*.pt")
    entry = torch.load(entry_path, weights_only=True)
    good = entry["images"].clone()
    entry["images"] = 255 - entry["images"]  # inverted pixels, the old checksum kept
    torch.save(entry, entry_path)

    r = _run(
        "train.py",
        _train_args(
            tmp_path, *CKPT, f"hydra.run.dir={run}", f"ckpt_path={prev / 'last.ckpt'}", "trainer.max_steps=32"
        ),
        tmp_path,
        umask=0o002,
    )
    shown = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in shown, shown[-3000:]
    assert "taking over the stale lock of PID 2147483646 on elsewhere" in shown
    assert not partial.exists() and (prev / "last.ckpt").is_file()
    assert not (run / "run.lock").exists(), "the lock is released at the end"
    corrupt = [line for line in shown.splitlines() if "failed its checksum" in line]
    assert len(corrupt) == 1 and str(entry_path) in corrupt[0]
    assert torch.equal(torch.load(entry_path, weights_only=True)["images"], good), "the entry was rebuilt"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 32
    assert (last.stat().st_mode & 0o777) == 0o664 and (entry_path.stat().st_mode & 0o777) == 0o664


# -------------------------------------------------------------------------------- 7. one-line errors


def test_bad_input_is_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path):
    from diffusion_lab.data.mnist import MNIST_MD5

    served = tmp_path / "served"
    served.mkdir()
    for name in MNIST_MD5:
        (served / name).write_bytes(b"not the MNIST file")
    mnist = tmp_path / "mnist"
    ck = f"ckpt={tiny_checkpoint}"
    sample = "diffusion_lab.sample"
    results = _run_all(
        {
            "no ckpt (sample)": (sample, ["n=2"], tmp_path),
            "steps=0": (sample, [ck, "sampler.steps=0", f"out={tmp_path / 'a'}"], tmp_path),
            "n=-5": (sample, [ck, "n=-5", f"out={tmp_path / 'neg'}"], tmp_path),
            "max_steps=abc": ("train.py", _train_args(tmp_path / "t", "trainer.max_steps=abc"), tmp_path),
            "md5": (
                "train.py",
                _train_args(
                    tmp_path / "m",
                    "dataset=mnist",
                    "dataset.split=test",
                    f"dataset.root={mnist}",
                    "dataset.download=true",
                    f"dataset.mirrors=['file://{served}']",
                ),
                tmp_path,
            ),
        }
    )
    _error_line(results["no ckpt (sample)"], "no checkpoint given: add ckpt=PATH")
    with pytest.raises(ValueError, match="no checkpoint given: add ckpt=PATH"):
        _evaluate([])  # the same checks in evaluate, run in this process (one subprocess fewer)
    _error_line(results["steps=0"], "sampler.steps=0 is not valid: steps must be an int in [1, 50]")
    with pytest.raises(
        ValueError, match=r"sampler\.steps=5000 is not valid: steps must be an int in \[1, 50\]"
    ):
        _sample([ck, "++sampler.steps=5000", f"out={tmp_path / 'b'}"])
    _error_line(results["n=-5"], "n=-5 is not valid: give a whole number >= 1")
    _error_line(results["max_steps=abc"], "trainer.max_steps='abc' is not valid: expected int")
    line = _error_line(results["md5"], "dataset 'mnist': download of 't10k-")
    assert "checksum mismatch" in line and "no partial file was kept" in line
    assert not any((tmp_path / d).exists() for d in ("a", "b", "neg")), "no output folder for refused input"
    assert not mnist.exists() or not list(mnist.iterdir()), "no partial download left"


# -------------------------------------------------------------------- 8. classifier-free guidance


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory) -> Path:
    from diffusion_lab.train import train

    root = tmp_path_factory.mktemp("cond_ckpt")
    cfg = compose_config(
        root,
        FAST
        + CKPT
        + [
            "class_conditional=true",
            "trainer.max_steps=30",
            "callbacks.model_checkpoint.every_n_train_steps=30",
        ],
    )
    return Path(train(cfg)["last_checkpoint"])


def _in_process_samples(ckpt: Path, guidance: float) -> np.ndarray:
    from functools import partial

    from diffusion_lab.sample import generate
    from diffusion_lab.samplers import ddim_sample
    from diffusion_lab.training.checkpoint import load_module

    module, _, _ = load_module(ckpt)
    sampler = partial(ddim_sample, steps=5, guidance_scale=guidance)
    return generate(module, sampler, 8, seed=0, batch_size=8)[0].numpy()


def test_guidance_comes_from_the_sampler_config(conditional_checkpoint, digits_classifier, tmp_path):
    out = tmp_path / "g3"
    args = [
        f"ckpt={conditional_checkpoint}",
        "n=8",
        "sampler=ddim",
        "sampler.steps=5",
        "seed=0",
        f"out={out}",
    ]
    r = _run("diffusion_lab.sample", [*args, "sampler.guidance_scale=3"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cli = np.load(out / "samples.npz")["samples"]
    assert np.array_equal(cli, _in_process_samples(conditional_checkpoint, 3.0)), "guidance 3 applied"
    assert not np.array_equal(cli, _in_process_samples(conditional_checkpoint, 1.0)), "and it matters"

    fids = {}
    for g in (1.0, 3.0):
        res = _evaluate(
            [
                f"ckpt={conditional_checkpoint}",
                "metric_names=[fid_classifier]",
                "n=20",
                "sampler=ddim",
                "sampler.steps=5",
                f"sampler.guidance_scale={g}",
                f"classifier_path={digits_classifier}",
                "device=cpu",
            ]
        )
        assert res["guidance_scale"] == g
        fids[g] = res["fid_classifier"]
    assert fids[1.0] != fids[3.0], "evaluate samples with the sampler's guidance"
