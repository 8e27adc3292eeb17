"""Optional extras: a feature whose extra is missing stops with one line naming the extra.

A missing package is simulated with ``sys.modules[name] = None`` (importing it then raises ImportError).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from diffusion_lab.summarize import write_summary
from diffusion_lab.training.loggers import build_loggers
from diffusion_lab.utils.cli import exit_on_bad_input
from diffusion_lab.utils.extras import MissingExtraError, check_hydra_plugins, require_extra

REPO = Path(__file__).resolve().parents[2]


def test_require_extra_names_the_extra(monkeypatch):
    require_extra("yaml", "plot", "anything")  # installed: no error
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingExtraError) as e:
        require_extra("tensorboard", "tensorboard", "logger=tensorboard")
    msg = str(e.value)
    extra = "pip install 'diffusion_lab[tensorboard]'"
    assert msg.startswith(f"logger=tensorboard needs the tensorboard extra: {extra}")
    assert "\n" not in msg


def test_tensorboard_logger_without_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = OmegaConf.create(
        {
            "tensorboard": {
                "_target_": "lightning.pytorch.loggers.TensorBoardLogger",
                "save_dir": str(tmp_path),
            }
        }
    )
    with pytest.raises(SystemExit) as e, exit_on_bad_input():
        build_loggers(cfg, tmp_path, OmegaConf.create({}))
    assert e.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "logger=tensorboard needs the tensorboard extra" in line


@pytest.mark.parametrize(
    "choice, plugin",
    [
        ("hydra/launcher=local_parallel", "hydra_plugins.hydra_joblib_launcher"),
        ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher"),
        ("hparams_search=optuna_fid", "hydra_plugins.hydra_optuna_sweeper"),
    ],
)
def test_launchers_and_sweepers_without_the_sweep_extra(monkeypatch, capsys, choice, plugin):
    check_hydra_plugins(["-m", choice, "seed=0,1"])  # installed: no error
    monkeypatch.setitem(sys.modules, plugin, None)
    check_hydra_plugins(["-m", "seed=0,1"])  # not asked for: no error
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", choice, "seed=0,1"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert e.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{choice} needs the sweep extra: pip install 'diffusion_lab[sweep]'" in line


def test_summary_without_the_plot_extra_writes_the_table(monkeypatch, tmp_path, capsys):
    for job, (lr, loss) in enumerate([("0.1", 1.0), ("0.2", 0.5)]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optimizer.lr={lr}"]))
        (tmp_path / str(job) / "result.yaml").write_text(yaml.safe_dump({"metrics": {"val/loss": loss}}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = write_summary(tmp_path)
    assert out["csv"].is_file() and out["md"].is_file() and "png" not in out
    assert not (tmp_path / "summary.png").exists()
    err = capsys.readouterr().err
    assert "the summary plot needs the plot extra: pip install 'diffusion_lab[plot]'" in err
