"""atomic_write: all or nothing, files follow the umask, a full disk is one line naming cause, path, bytes."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from diffusion_lab.utils.fileio import DiskFullError, atomic_write, remove_stale_temp_files


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_new_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "x.pt", lambda f: torch.save({"w": torch.ones(3)}, f))
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_no_space_left_keeps_the_old_file_and_names_cause_path_and_size(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous")

    def write(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as e:
        atomic_write(path, write)
    msg = str(e.value)
    assert msg.startswith(f"no space left on device writing {path}: needs ") and "\n" not in msg
    assert "bytes free there" in msg
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_other_errors_propagate_unchanged_and_leave_nothing(tmp_path):
    def write(f):
        f.write(b"half")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        atomic_write(tmp_path / "a.pt", write)
    assert not list(tmp_path.iterdir())


def _limited():  # in the child: a 64 KiB file-size limit; EFBIG instead of the killing SIGXFSZ
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))


def test_file_size_limit_through_torch_save(tmp_path):
    """torch.save itself reports only 'unexpected pos'; the cause, path and exact size come out instead."""
    code = (
        "import torch; from diffusion_lab.utils.fileio import atomic_write\n"
        "obj = {'w': torch.zeros(100_000)}\n"
        f"try:\n    atomic_write({str(tmp_path / 'big.pt')!r}, lambda f: torch.save(obj, f))\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
        "import io; b = io.BytesIO(); torch.save(obj, b); print('size', b.tell())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=_limited)
    first, size = r.stdout.strip().splitlines()
    n = int(size.split()[1])
    assert first.startswith(f"DiskFullError file too large writing {tmp_path / 'big.pt'}: needs {n:,} bytes")
    assert "file-size limit of 65,536 bytes" in first
    assert not list(tmp_path.iterdir()), "the partial temporary file is removed"


def test_remove_stale_temp_files(tmp_path):
    (tmp_path / ".last.ckpt.0a1b2c3d.tmp").write_bytes(b"half")
    (tmp_path / "last.ckpt").write_bytes(b"whole")
    removed = remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".last.ckpt.0a1b2c3d.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
