"""Scale-out: DDP in 2 CPU processes, Hydra multiruns (basic and joblib launchers), SLURM config, summary."""

from __future__ import annotations

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.summarize import collect, write_summary
from diffusion_lab.train import CONF_DIR

TINY = [
    "dataset=digits",
    "dataset.image_size=8",
    "model=mlp",
    "model.hidden_dim=64",
    "model.num_layers=2",
    "logger=csv",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_grid.num_samples=8",
    "sampler=ddim",
    "sampler.steps=5",
    "schedule.timesteps=50",
    "print_config=false",
    "trainer.limit_val_batches=2",
]


def test_ddp_cpu_two_processes(tmp_path, digits_classifier, run_command):
    """2 gloo processes: a few steps, a sample grid and a classifier-feature FID from both ranks' samples,
    one checkpoint folder, one run directory."""
    r = run_command(
        "train.py",
        TINY
        + [
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "callbacks.sample_grid.every_n_steps=6",
            "callbacks.model_checkpoint.every_n_train_steps=3",
            "metrics.every_n_steps=6",
            "metrics.n=32",
            f"metrics.classifier_path={digits_classifier}",
            "metrics.names=[fid_classifier,class_histogram]",
            f"paths.log_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache",
        ],
        tmp_path,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in r.stderr + r.stdout, "two processes ran"
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1, f"one run directory, got {runs}"
    run = runs[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "samples" / "step0000006.png").is_file()
    result = yaml.safe_load((run / "result.yaml").read_text())
    assert result["global_step"] == 6
    fid = result["metrics"]["val/fid_classifier"]
    assert fid > 0
    # the metric saw both ranks' samples: 2 x 16 = 32
    assert result["metrics"]["val/metric_samples"] == 32
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["DiffusionDataModule"]["train_batches"]["world_size"] == 2


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_two_by_two(tmp_path, launcher, run_command):
    args = (
        ["-m"]
        + TINY
        + [
            "objective=eps,v",
            "schedule=linear,cosine",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "callbacks.sample_grid.every_n_steps=0",
            "callbacks.model_checkpoint.every_n_train_steps=3",
            f"paths.log_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache",
        ]
    )
    if launcher == "joblib":
        args += ["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"]
    else:  # one offline wandb run per job, grouped by the sweep, tagged with the swept values
        args += ["logger=wandb"]
    r = run_command("train.py", args, tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    assert all((j / "checkpoints" / "last.ckpt").is_file() for j in jobs)
    if launcher == "basic":
        for job in jobs:
            (records,) = job.glob("wandb/offline-run-*/run-*.wandb")
            data = records.read_bytes()
            swept = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            tags = [o for o in swept if o.startswith(("objective=", "schedule="))]
            assert sweep.name.encode() in data, "wandb group = the sweep"
            assert all(t.encode() in data for t in tags), f"swept values {tags} as wandb tags"
    out = write_summary(sweep)
    rows, swept, metrics = collect(sweep)
    assert len(rows) == 4 and set(swept) == {"objective", "schedule"}
    assert {(r["objective"], r["schedule"]) for r in rows} == {
        ("eps", "linear"),
        ("eps", "cosine"),
        ("v", "linear"),
        ("v", "cosine"),
    }
    assert "val/loss" in metrics
    table = out["md"].read_text().strip().splitlines()
    assert len(table) == 2 + 4
    assert out["png"].is_file() and out["csv"].is_file()


def test_slurm_launcher_config_renders(tmp_path):
    """The SLURM launcher cannot run here: check that it composes and renders its submission parameters."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp",
                "trainer.devices=4",
                "trainer.num_nodes=2",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=90",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.timeout_min == 90
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4 and launcher.nodes == 2
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder")}
    SlurmLauncher(**params)  # accepts every rendered parameter


def test_optuna_preset_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna_fid"], return_hydra_config=True)
    assert cfg.optimized_metric == "best/fid_classifier"
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "dataset.batch_size"}
