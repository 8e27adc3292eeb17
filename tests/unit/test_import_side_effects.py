"""Importing the package changes nothing in the host program: no environment variables (thread settings),
no OmegaConf resolvers; the commands set those up themselves, before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import os, sys
before = dict(os.environ)
import diffusion_lab
import diffusion_lab.api
from diffusion_lab import Pipeline, load
{more}
from omegaconf import OmegaConf
changed = {{k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}}
assert not changed, changed
assert not OmegaConf.has_resolver("cpu_precision")
print("torch" in sys.modules)
"""


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**full, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_importing_the_package_and_its_api_leaves_the_environment_alone():
    done = _run(CHECK.format(more=""))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"  # the API loads torch on first use, so configure_threads can work


def test_importing_a_command_module_as_a_library_leaves_the_environment_alone():
    # (modules that import Lightning get its own two variables, PYTORCH_NVML_BASED_CUDA_CHECK and
    # TORCHINDUCTOR_CACHE_DIR, from lightning.fabric's import: these two do not import it)
    done = _run(CHECK.format(more="import diffusion_lab.sample, diffusion_lab.export"))
    assert done.returncode == 0, done.stderr[-2000:]


def test_train_is_the_training_module_and_the_api_function():
    done = _run(
        "import diffusion_lab, types\n"
        "from diffusion_lab.train import train, main, CONF_DIR\n"
        "import diffusion_lab.api as api\n"
        "assert isinstance(diffusion_lab.train, types.ModuleType) and callable(diffusion_lab.train)\n"
        "assert diffusion_lab.train.train is train and diffusion_lab.load is api.load\n"
        "from diffusion_lab import train as t\n"
        "assert t is diffusion_lab.train\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]
