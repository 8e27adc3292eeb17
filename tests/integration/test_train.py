"""Training end to end on CPU: every objective x schedule, configs, resume, bad overrides, loggers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from diffusion_lab.train import CONF_DIR, train
from diffusion_lab.training.checkpoint import load_module

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


GROUPS = {p.name: sorted(q.stem for q in p.glob("*.yaml")) for p in Path(CONF_DIR).iterdir() if p.is_dir()}


def _compose(tmp_path: Path, *overrides: str):
    """The training config with ``overrides``; caches and run directory under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[*overrides, f"paths.cache_dir={tmp_path}/cache", f"paths.output_dir={tmp_path}/run"],
        )


def _tiny_diffusion(objective: str = "eps"):
    from diffusion_lab.processes.diffusion import GaussianDiffusion
    from diffusion_lab.processes.schedules import make_schedule

    return GaussianDiffusion(make_schedule("linear", timesteps=50), parameterization=objective)


@pytest.mark.parametrize("option", GROUPS["schedule"])
def test_schedule_configs_build_valid_schedules(tmp_path, option):
    cfg = _compose(tmp_path, f"schedule={option}")
    schedule = instantiate(cfg.schedule)
    T = cfg.schedule.timesteps
    betas, abar = schedule.betas, schedule.alphas_cumprod
    assert betas.shape == (T,) and betas.dtype == torch.float64
    assert (betas > 0).all() and (betas < 1).all(), f"{option}: betas in (0, 1)"
    assert (abar[1:] < abar[:-1]).all() and 0 < abar[-1] < abar[0] < 1, f"{option}: alpha-bar decreases"


@pytest.mark.parametrize("option", GROUPS["objective"])
def test_objective_configs_build_and_give_a_finite_loss(tmp_path, option):
    cfg = _compose(tmp_path, f"objective={option}", "schedule.timesteps=50")
    diffusion = instantiate(cfg.objective, _partial_=True)(schedule=instantiate(cfg.schedule))
    learned = cfg.objective.get("variance") in ("learned", "learned_range")
    assert diffusion.model_out_channels(3) == (6 if learned else 3), option
    out_channels = diffusion.model_out_channels(1)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    terms = diffusion.training_losses(lambda x, t, y: torch.zeros(4, out_channels, 8, 8), x0)
    assert terms["loss"].shape == (4,) and torch.isfinite(terms["loss"]).all(), option


@pytest.mark.parametrize("option", GROUPS["model"])
def test_model_configs_build_and_keep_the_shape(tmp_path, option):
    cfg = _compose(tmp_path, f"model={option}")
    size = 16
    model = instantiate(cfg.model, in_channels=1, out_channels=2, image_size=size, num_classes=10).eval()
    for y in (torch.tensor([3, 10]), None):  # 10 and None: the null class
        with torch.no_grad():
            out = model(torch.randn(2, 1, size, size), torch.tensor([0, 999]), y)
        assert out.shape == (2, 2, size, size) and torch.isfinite(out).all(), option


@pytest.mark.parametrize("option", GROUPS["sampler"])
def test_sampler_configs_build_samplers_that_run(tmp_path, option):
    from diffusion_lab.models import MLP

    cfg = _compose(tmp_path, f"sampler={option}")
    sampler = instantiate(cfg.sampler)
    assert callable(sampler), option
    diffusion = _tiny_diffusion()
    model = MLP(1, 1, 8, hidden_dim=16, num_layers=1).eval()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        x = sampler(model, diffusion, x_T, steps=2, generator=g)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1, option


@pytest.mark.parametrize("option", GROUPS["optimizer"])
def test_optimizer_configs_build(tmp_path, option):
    cfg = _compose(tmp_path, f"optimizer={option}")
    opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("option", GROUPS["lr_scheduler"])
def test_lr_scheduler_configs_start_the_warmup_above_zero(tmp_path, option):
    cfg = _compose(tmp_path, f"lr_scheduler={option}", "trainer.max_steps=100", "lr_scheduler.warmup_steps=4")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = instantiate(cfg.lr_scheduler)(opt)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0], abs=1e-3), option


@pytest.mark.parametrize("option", GROUPS["dataset"])
def test_dataset_configs_build(tmp_path, option):
    from diffusion_lab.data import DiffusionDataModule

    cfg = _compose(tmp_path, f"dataset={option}")
    dm = instantiate(cfg.dataset)
    assert isinstance(dm, DiffusionDataModule) and dm.name == cfg.dataset.name
    assert (dm.image_size, dm.channels) == (cfg.dataset.image_size, cfg.dataset.channels)


@pytest.mark.parametrize("option", GROUPS["trainer"])
def test_trainer_configs_build(tmp_path, option):
    """GPU options are built for the CPU here: the rest of the settings must hold."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    cfg = _compose(tmp_path, f"trainer={option}")
    trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False)
    assert isinstance(trainer, pl.Trainer) and trainer.max_steps == cfg.trainer.max_steps
    assert isinstance(trainer.strategy, DDPStrategy) == option.startswith("ddp"), option
    assert str(trainer.precision) == str(cfg.trainer.precision)


@pytest.mark.parametrize("option", GROUPS["logger"])
def test_logger_configs_build(tmp_path, option):
    from lightning.pytorch.loggers import Logger

    cfg = _compose(tmp_path, f"logger={option}")
    assert cfg.logger, option
    for name, node in cfg.logger.items():
        extra = {"offline": True} if name == "wandb" else {}  # the run itself starts lazily: not here
        logger = instantiate(node, **extra)
        assert isinstance(logger, Logger), name
        assert Path(logger.save_dir) == tmp_path / "run", name


@pytest.mark.parametrize("option", GROUPS["callbacks"])
def test_callback_configs_build(tmp_path, option):
    import lightning.pytorch as pl

    from diffusion_lab.training.callbacks import EMA

    cfg = _compose(tmp_path, f"callbacks={option}")
    built = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    assert all(isinstance(cb, pl.Callback) for cb in built), option
    assert any(isinstance(cb, EMA) for cb in built) == (option in ("default", "phema")), option


@pytest.mark.parametrize("option", GROUPS["metric_suite"])
def test_metrics_configs_build(tmp_path, option):
    from diffusion_lab.metrics import MetricSuite

    cfg = _compose(tmp_path, f"metric_suite@metrics={option}")
    suite = MetricSuite.from_config(cfg.metrics)
    assert suite.names == list(cfg.metrics.names)
    assert cfg.metrics.sampler is None or callable(instantiate(cfg.metrics.sampler))


@pytest.mark.parametrize("option", GROUPS["experiment"])
def test_experiment_presets_build_a_model_that_runs(tmp_path, option):
    """Each preset composes, and its schedule, objective, backbone (one forward pass at the dataset's
    size), sampler, optimizer and learning-rate schedule build."""
    cfg = _compose(tmp_path, f"experiment={option}")
    dm = instantiate(cfg.dataset)
    assert dm.name == cfg.dataset.name
    diffusion = instantiate(cfg.objective, _partial_=True)(schedule=instantiate(cfg.schedule))
    C, H = dm.channels, dm.image_size
    model = instantiate(
        cfg.model, in_channels=C, out_channels=diffusion.model_out_channels(C), image_size=H, num_classes=None
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(1, C, H, H), torch.tensor([5]))
    assert out.shape == (1, diffusion.model_out_channels(C), H, H), option
    assert callable(instantiate(cfg.sampler))
    opt = instantiate(cfg.optimizer)(model.parameters())
    instantiate(cfg.lr_scheduler)(opt)
    assert opt.param_groups[0]["lr"] > 0, "the learning rate at step 0 is not zero"
    if option == "hoda32_uncond":  # experiments/uncond_recipe: shifted sigmoid schedule, class-balanced draws
        from diffusion_lab.processes.schedules import make_schedule

        assert dm.balance_classes
        plain = make_schedule("sigmoid", 1000, start=-3.0, end=3.0, tau=1.0)
        assert instantiate(cfg.schedule).log_snr[500].item() == pytest.approx(plain.log_snr[500].item() - 3.0)
        sampler = instantiate(cfg.sampler)  # Heun 18 steps with a little churn (EDM Algorithm 2)
        assert sampler.func.__name__ == "heun_sample"
        assert (sampler.keywords["steps"], sampler.keywords["S_churn"]) == (18, 2.0)


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


@pytest.mark.parametrize("enabled", [True, False])
def test_enable_progress_bar_false_drops_the_step_bar(tmp_path, enabled):
    """trainer.enable_progress_bar=false with the default callbacks: no progress bar callback is built
    (Lightning refuses a ProgressBar callback when the bar is disabled); the default keeps the bar."""
    from lightning.pytorch.callbacks import ProgressBar

    from diffusion_lab.train import _callbacks
    from diffusion_lab.training.progress_bar import StepProgressBar

    cfg = _compose(tmp_path, "callbacks=default", f"trainer.enable_progress_bar={str(enabled).lower()}")
    bars = [cb for cb in _callbacks(cfg) if isinstance(cb, ProgressBar)]
    assert [type(b) for b in bars] == ([StepProgressBar] if enabled else [])
