"""The run lock on filelock: a second process is refused in one line naming the holder; a lock whose process
died is taken over (and said so); a file system without locks runs unlocked with a warning."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from filelock import FileLock, Timeout

from diffusion_lab.training import run_lock
from diffusion_lab.training.run_lock import (
    GUARD_NAME,
    LOCK_NAME,
    lock_run_dir,
    release_run_dir,
    run_dir_in_use,
)

# another process's attempt: prints the refusal (one line) or "took"
ATTEMPT = """
import sys
from diffusion_lab.training.run_lock import RunDirLocked, lock_run_dir
try:
    print("took" if lock_run_dir(sys.argv[1]) else "not taken")
except RunDirLocked as e:
    print(e)
"""
# another process that takes the lock, says so, and waits to be killed
HOLD = """
import sys, time
from diffusion_lab.training.run_lock import lock_run_dir
lock_run_dir(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(autouse=True)
def _launching_process(monkeypatch):
    for var in run_lock._RANK_VARS:  # a run launched by torchrun or SLURM would set them
        monkeypatch.delenv(var, raising=False)


def _python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in run_lock._RANK_VARS}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120, **kwargs
    )


def test_second_process_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    assert lock_run_dir(run)
    try:
        assert run_dir_in_use(run)
        r = _python(ATTEMPT, str(run))
        assert r.returncode == 0, r.stderr
        (line,) = r.stdout.splitlines()
        assert line.startswith(f"run directory {run.resolve()} is in use by PID {os.getpid()} on ")
        assert socket.gethostname() in line and "another folder" in line
        # the lock is filelock's: a FileLock on the guard file cannot be taken while the run holds it
        with pytest.raises(Timeout):
            FileLock(run / GUARD_NAME, timeout=0).acquire()
    finally:
        release_run_dir(run)
    assert not (run / LOCK_NAME).exists() and not run_dir_in_use(run)
    r = _python(ATTEMPT, str(run))
    assert r.stdout.strip() == "took", r.stdout + r.stderr


def test_same_process_takes_it_again_freely(tmp_path):
    assert lock_run_dir(tmp_path)
    try:
        assert lock_run_dir(tmp_path) is False  # already held here: no error, nothing taken
        assert run_dir_in_use(tmp_path)
    finally:
        release_run_dir(tmp_path)


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in run_lock._RANK_VARS},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_dir_in_use(run)
        left = (run / LOCK_NAME).read_text()
        assert left.startswith(f"PID {holder.pid} on ")
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays, the OS drops the lock
        holder.wait(timeout=60)
    deadline = time.monotonic() + 10
    while run_dir_in_use(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (run / LOCK_NAME).read_text() == left
    with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
        assert lock_run_dir(run)
    try:
        (warning,) = [r.getMessage() for r in caplog.records]
        assert f"taking over the stale lock of {left} (no longer running)" in warning
        assert (run / LOCK_NAME).read_text().startswith(f"PID {os.getpid()} on ")
    finally:
        release_run_dir(run)


def test_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    class NoLocks:
        def __init__(self, *args, **kwargs):
            pass

        def acquire(self):
            raise NotImplementedError("FileSystem does not appear to support flock")

    monkeypatch.setattr(run_lock, "FileLock", NoLocks)
    with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
        assert lock_run_dir(tmp_path) is False
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "cannot be locked" in warning and "not guarding against a second run" in warning
    assert not run_dir_in_use(tmp_path)


def test_ranks_other_than_0_do_not_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert lock_run_dir(tmp_path) is False
    assert not (tmp_path / LOCK_NAME).exists()
