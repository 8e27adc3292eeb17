"""Training end to end on CPU: every objective x schedule, configs, resume, bad overrides, loggers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from diffusion_lab.checkpoint import load_module
from diffusion_lab.train import CONF_DIR, train

OBJECTIVES = ["eps", "x0", "v", "vlb", "hybrid"]
SCHEDULES = ["linear", "cosine", "sigmoid", "quadratic", "geometric"]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_few_steps_each_objective_and_schedule(make_cfg, objective, schedule):
    cfg = make_cfg(f"objective={objective}", f"schedule={schedule}", "schedule.timesteps=50")
    result = train(cfg)
    assert result["global_step"] == 3
    m = result["metrics"]
    assert torch.isfinite(torch.tensor(m["train/loss"])) and torch.isfinite(torch.tensor(m["val/loss"]))
    assert 0 < m["val/bpd"] < 1e4  # an untrained model's bound is loose, but finite and positive


def test_unet_with_checkpoint_samples_and_ema(make_cfg, tmp_path):
    cfg = make_cfg(
        "model=unet_tiny",
        "callbacks=default",
        "callbacks.sample_grid.every_n_steps=2",
        "callbacks.sample_grid.num_samples=4",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "sampler=ddim",
        "sampler.steps=5",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "callbacks.progress_bar=null",
    )
    result = train(cfg)
    run = Path(result["output_dir"])
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "samples" / "step0000002.png").is_file() and (run / "samples" / "final.png").is_file()
    assert (run / "animations" / "final.gif").is_file()
    assert (run / "csv" / "metrics.csv").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4, "last.ckpt is written at the end too, not only every 3 steps"
    assert "current_model_state" in ckpt, "EMA weights are the checkpoint's state_dict, raw ones beside them"
    ema = ckpt["state_dict"]
    raw = ckpt["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.startswith("model.")), "EMA differs from raw"
    module, _, _ = load_module(run / "checkpoints" / "last.ckpt")
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, ema["model." + k]), "load_module gives the EMA weights"


def test_every_config_instantiates(tmp_path):
    """Each option of each group composes and its object builds."""
    GlobalHydra.instance().clear()
    groups = {
        p.name: sorted(q.stem for q in p.glob("*.yaml")) for p in Path(CONF_DIR).iterdir() if p.is_dir()
    }
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for group in ["schedule", "objective", "sampler", "optimizer", "lr_scheduler", "model", "dataset"]:
            for option in groups[group]:
                cfg = compose("config", overrides=[f"{group}={option}", f"paths.cache_dir={tmp_path}"])
                node = cfg[group]
                if group == "objective":
                    obj = instantiate(node, _partial_=True)(schedule=instantiate(cfg.schedule))
                elif group == "model":
                    obj = instantiate(node, in_channels=1, out_channels=2, image_size=16, num_classes=None)
                elif group == "lr_scheduler":
                    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
                    obj = instantiate(node, total_steps=100)(opt)
                else:
                    obj = instantiate(node)
                assert obj is not None, f"{group}={option}"
        for group in ["trainer", "logger", "callbacks"]:
            for option in groups[group]:
                cfg = compose("config", overrides=[f"{group}={option}"])
                assert cfg[group] is not None, f"{group}={option}"
        for option in groups["experiment"]:  # global presets: they compose, and their objects build
            cfg = compose("config", overrides=[f"experiment={option}", f"paths.cache_dir={tmp_path}"])
            assert instantiate(cfg.objective, _partial_=True)(schedule=instantiate(cfg.schedule)) is not None
            assert instantiate(cfg.dataset).name == cfg.dataset.name


def test_unknown_choice_and_bad_value_exit_cleanly(tmp_path, run_command):
    r = run_command("train.py", ["schedule=cosin", f"paths.log_dir={tmp_path}"], tmp_path)
    assert r.returncode != 0
    assert "cosine" in r.stderr and "linear" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run_command(
        "train.py",
        ["schedule.timesteps=1", "logger=csv", f"paths.log_dir={tmp_path}", "print_config=false"],
        tmp_path,
    )
    assert r.returncode != 0
    assert "timesteps must be an integer >= 2" in r.stderr
    assert "Traceback" not in r.stderr


def _fast_cli(tmp_path: Path, steps: int) -> list[str]:
    return [
        "dataset=digits",
        "dataset.image_size=8",
        "model=mlp",
        "model.hidden_dim=64",
        "model.num_layers=2",
        "logger=csv",
        "callbacks=default",
        "callbacks.sample_grid=null",
        "callbacks.progress_bar=null",
        "callbacks.model_checkpoint.every_n_train_steps=5",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "schedule.timesteps=50",
        "print_config=false",
        "seed=7",
        f"paths.log_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.deterministic=true",
        "dataset.batch_size=32",
    ]


def _weights(ckpt: Path) -> dict:
    c = torch.load(ckpt, weights_only=False)
    return c["global_step"], c["current_model_state"], c["state_dict"], c["optimizer_states"][0]["state"]


def test_resume_after_kill_matches_straight_run(tmp_path, run_command):
    """Train 2N steps straight; train again, kill -9 at step N + 3 (last checkpoint at N), resume to 2N:
    the raw weights, the EMA weights and the optimizer state match bitwise."""
    N = 40
    straight = run_command("train.py", _fast_cli(tmp_path / "a", 2 * N), tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    (a_ckpt,) = (tmp_path / "a").glob("train/runs/*/checkpoints/last.ckpt")

    # a test-only callback sleeping between steps leaves time to interrupt mid-run
    # a test-only callback kills the process with SIGKILL at step N + 3, between two checkpoints
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    kill = ["+callbacks.kill._target_=kill_callback.KillAt", f"+callbacks.kill.step={N + 3}"]
    killed = run_command("train.py", _fast_cli(tmp_path / "b", 2 * N) + kill, tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (b_ckpt,) = (tmp_path / "b").glob("train/runs/*/checkpoints/last.ckpt")
    resumed = run_command("train.py", _fast_cli(tmp_path / "b", 2 * N) + [f"ckpt_path={b_ckpt}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finals = sorted(
        (tmp_path / "b").glob("train/runs/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
    )
    sa, raw_a, ema_a, opt_a = _weights(a_ckpt)
    sb, raw_b, ema_b, opt_b = _weights(finals[-1])
    assert sa == sb == 2 * N
    for k in raw_a:
        assert torch.equal(raw_a[k], raw_b[k]), f"raw weight {k} differs after resume"
        assert torch.equal(ema_a[k], ema_b[k]), f"EMA weight {k} differs after resume"
    for i in opt_a:
        assert torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"])


def test_incompatible_checkpoint_is_refused(tmp_path, run_command):
    r = run_command("train.py", _fast_cli(tmp_path, 5), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (ckpt,) = tmp_path.glob("train/runs/*/checkpoints/last.ckpt")
    r = run_command(
        "train.py",
        _fast_cli(tmp_path, 10) + ["model.hidden_dim=32", "objective=v", f"ckpt_path={ckpt}"],
        tmp_path,
    )
    assert r.returncode != 0
    assert "does not fit this config" in r.stderr and "model.hidden_dim" in r.stderr
    assert "objective.parameterization" in r.stderr and "Traceback" not in r.stderr
    r = run_command("train.py", _fast_cli(tmp_path, 10) + ["ckpt_path=last"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_wandb_offline_run_holds_logged_keys(make_cfg):
    cfg = make_cfg(
        "logger=wandb",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "model=unet_tiny",
        "callbacks=default",
        "callbacks.progress_bar=null",
        "callbacks.throughput.window_size=2",
        "callbacks.sample_grid.num_samples=4",
        "sampler=ddim",
        "sampler.steps=3",
    )
    result = train(cfg)
    import wandb

    wandb.finish()
    run_dirs = list(Path(result["output_dir"]).glob("wandb/offline-run-*"))
    assert len(run_dirs) == 1, "one wandb offline run in the run directory"
    # The offline run file holds protobuf records, whose keys are stored as plain UTF-8 strings.
    (records,) = run_dirs[0].glob("run-*.wandb")
    data = records.read_bytes()
    for key in (
        "train/loss",
        "val/loss",
        "val/bpd",
        "train/grad_norm",
        "train/device/samples_per_sec",
        "num_parameters",
        "objective",
        "samples",
    ):
        assert key.encode() in data, f"{key} missing from the wandb run"


def test_tensorboard_logger(make_cfg):
    result = train(make_cfg("logger=tensorboard"))
    assert list(Path(result["output_dir"]).glob("tensorboard/events.out.tfevents.*"))


def test_sample_quality_at_the_end_of_training(make_cfg, digits_classifier):
    """FID during training: every N steps through self.log, and once more when training ends (where
    Lightning forbids self.log) straight to the loggers; the best FID and its sample count are kept."""
    cfg = make_cfg(
        "metrics.every_n_steps=2",
        "metrics.n=16",
        f"metrics.classifier_path={digits_classifier}",
        "metrics.names=[fid_classifier,kid_classifier,class_histogram]",
        "sampler=ddim",  # the run's sampler draws the FID samples too
        "sampler.steps=3",
        "callbacks=default",
        "callbacks.progress_bar=null",
        "callbacks.sample_grid=null",
        "trainer.max_steps=3",
    )
    result = train(cfg)
    m = result["metrics"]
    assert m["val/metric_samples"] == 16 and m["val/fid_classifier"] > 0
    assert m["best/fid_classifier"] <= m["val/fid_classifier"] + 1e-9
    csv_text = (Path(result["output_dir"]) / "csv" / "metrics.csv").read_text()
    header, *rows = csv_text.strip().splitlines()
    col = header.split(",").index("val/fid_classifier")
    steps = [r.split(",")[header.split(",").index("step")] for r in rows if r.split(",")[col]]
    assert len(steps) == 2, "evaluated at step 2 and at the end (step 3)"
    assert list(Path(result["output_dir"]).glob("checkpoints/best-fid_classifier-*.ckpt"))
