"""Preemption: SIGTERM or SIGUSR1 at a random step saves a resumable last.ckpt and stops cleanly; resuming
with ckpt_path=last ends at exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, run_command

from diffusion_lab.train import train
from diffusion_lab.training.preemption import PREEMPTED_EXIT_CODE, Preempted, requeued_checkpoint

STEPS = 10
SETUP = [
    *FAST,
    "callbacks=default",
    "callbacks.sample_grid=null",
    "callbacks.progress_bar=null",
    "callbacks.best_checkpoint=null",
    "callbacks.model_checkpoint.every_n_train_steps=1000",  # only the preemption and the final save
    "callbacks.ema.decay=0.9",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=4",
    "dataset.batch_size=16",
    "threads=1",
]


def _signal_at(step: int, signum: str) -> list[str]:
    return [
        "+callbacks.signal._target_=signal_callback.SignalAt",
        f"+callbacks.signal.step={step}",
        f"+callbacks.signal.signum={signum}",
    ]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return {
        **{f"ema.{k}": v for k, v in ckpt["state_dict"].items()},
        **{f"raw.{k}": v for k, v in ckpt["current_model_state"].items()},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{k} differs")


def test_sigterm_at_a_random_step_resumes_to_the_same_weights(tmp_path):
    step = random.Random().randint(2, STEPS - 2)
    before = signal.getsignal(signal.SIGTERM)
    full = train(compose_config(tmp_path / "full", SETUP))
    reference = _weights(Path(full["last_checkpoint"]))

    with pytest.raises(
        Preempted, match=rf"^stopped by a termination signal at step {step}: saved .*last\.ckpt"
    ):
        train(compose_config(tmp_path / "cut", [*SETUP, *_signal_at(step, "SIGTERM")]))
    last = tmp_path / "cut" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step, f"SIGTERM at step {step}"
    assert not (tmp_path / "cut" / "run" / "result.yaml").exists(), "stopped, not finished"
    assert signal.getsignal(signal.SIGTERM) is before, "Lightning restored the handler it replaced"

    resumed = train(compose_config(tmp_path / "resumed", [*SETUP, f"ckpt_path={last}"]))
    assert resumed["global_step"] == STEPS
    _assert_same(reference, _weights(Path(resumed["last_checkpoint"])))
    assert any(not torch.equal(reference[k], v) for k, v in _weights(last).items()), "the cut was real"


@pytest.mark.slow
def test_sigusr1_from_the_command_line_then_ckpt_path_last(tmp_path):
    """SIGUSR1 (outside SLURM) stops like SIGTERM: one line, exit 143; ``ckpt_path=last`` finishes the run."""
    step = random.Random().randint(2, STEPS - 2)
    args = [*SETUP, f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"]
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cut = run_command("train.py", [*args, *_signal_at(step, "SIGUSR1")], tmp_path, env=env)
    shown = cut.stdout + cut.stderr
    assert cut.returncode == PREEMPTED_EXIT_CODE == 143, shown[-3000:]
    assert "Traceback" not in shown
    lines = [line for line in cut.stderr.splitlines() if line.startswith("preempted: ")]
    assert len(lines) == 1 and f"at step {step}: saved " in lines[0] and "ckpt_path=last" in lines[0]
    (last,) = (tmp_path / "train" / "runs").glob("*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == step

    done = run_command("train.py", [*args, "ckpt_path=last"], tmp_path, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    finals = [p for p in (tmp_path / "train" / "runs").glob("*/checkpoints/last.ckpt") if p != last]
    assert len(finals) == 1 and torch.load(finals[0], weights_only=True)["global_step"] == STEPS
    full = train(compose_config(tmp_path / "full", SETUP))
    _assert_same(_weights(Path(full["last_checkpoint"])), _weights(finals[0]))


def test_requeued_slurm_job_resumes_from_its_own_run_directory(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeued_checkpoint(tmp_path) is None, "a first start begins afresh"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_checkpoint(tmp_path) == ckpt
    assert requeued_checkpoint(tmp_path / "elsewhere") is None


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_with_one_line_and_the_run_resumes(tmp_path):
    """kill -9 of rank 1 in a 2-process gloo run: rank 0 stops within seconds (not the process group's
    timeout), one line, non-zero exit; ``ckpt_path=last`` then finishes the run."""
    import time

    args = [
        *SETUP,
        "trainer=ddp_cpu",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.max_steps=8",
        f"paths.log_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    kill = [
        "+callbacks.kill._target_=signal_callback.KillRankAt",
        "+callbacks.kill.step=5",
        "+callbacks.kill.rank=1",
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    cut = run_command("train.py", [*args, *kill], tmp_path, env=env, timeout=120)
    took = time.monotonic() - start
    shown = cut.stdout + cut.stderr
    assert cut.returncode != 0, shown[-3000:]
    assert "Traceback" not in shown, shown[-3000:]
    errors = [line for line in cut.stderr.splitlines() if line.startswith("error: rank ")]
    assert len(errors) == 1 and "another process of this run died" in errors[0], shown[-3000:]
    assert took < 100, f"{took:.0f} s: the surviving rank waited for the timeout"
    (last,) = (tmp_path / "train" / "runs").glob("*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 4

    done = run_command("train.py", [*args, "ckpt_path=last"], tmp_path, env=env, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    finals = [p for p in (tmp_path / "train" / "runs").glob("*/checkpoints/last.ckpt") if p != last]
    assert len(finals) == 1 and torch.load(finals[0], weights_only=True)["global_step"] == 8
