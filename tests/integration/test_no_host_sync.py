"""A training step never waits for the device outside logging steps (diffusion_lab/training/host_sync.py).

A real ``train()`` call (unet_tiny, default callbacks: checkpoints, EMA, throughput, LR monitor, the progress
bar drawn) runs with ``trainer.log_every_n_steps=5``; over every step that is not a logging step, from the
batch's transfer to the end of Lightning's per-batch metric updates, a dispatch mode counts what makes the
host wait for the device on a GPU: reads of a device value (``aten._local_scalar_dense``: ``.item()``,
``bool(t)``, ``.tolist()``, ``float(t)``), ops whose output size depends on the data (``nonzero``, boolean
indexing, ``unique``, ...), tensors built from host data (``torch.tensor(...)``: a host-to-device copy) and
copies between devices. On the CPU it proves the code path (the same Python runs on a GPU); on a GPU the
same run also runs under ``torch.cuda.set_sync_debug_mode("error")``.

The non-finite guard keeps its guarantees without reading back inside the step: a skipped step leaves the
weights and the optimizer state bit-identical, and under ``stop`` the one-line error still comes, at the next
logging step or checkpoint save, with the last checkpoint on disk the last finite one.
"""

from __future__ import annotations

import csv
import traceback
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffusion_lab.train as train_module
from diffusion_lab.train import train
from diffusion_lab.training.lit_module import DiffusionModule

aten = torch.ops.aten
LOG_EVERY = 5
MAX_STEPS = 12
NAN_STEP = 6  # a step that is not a logging step (logging steps: 4 and 9, counted from 0)

# ops after which the host waits for a GPU: they read a value back or size their output by the data
READS_BACK = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.bincount.default,
    aten.repeat_interleave.Tensor,
}
HOST_DATA = {aten.lift_fresh.default}  # torch.tensor(host data): a host-to-device copy on a GPU


def _device_of(x) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for a GPU, with the call site of each (for failure messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._waits(func, args, kwargs):
            self.calls[f"{func} at {self._site()}"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _waits(func, args, kwargs) -> bool:
        if func in READS_BACK or func in HOST_DATA:
            return True
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else []
            return any(i is not None and i.dtype == torch.bool for i in indices)  # boolean mask: nonzero
        if func in (aten._to_copy.default, aten.copy_.default):  # a copy between the host and a device
            src = _device_of(args[1]) if func is aten.copy_.default else _device_of(args[0])
            dst = _device_of(args[0]) if func is aten.copy_.default else kwargs.get("device")
            return src is not None and dst is not None and torch.device(dst).type != src.type
        return False

    @staticmethod
    def _site() -> str:
        frames = [
            f"{Path(f.filename).name}:{f.lineno} {f.name}"
            for f in traceback.extract_stack()
            if ("diffusion_lab" in f.filename or "lightning" in f.filename or "torch/optim" in f.filename)
            and "_python_dispatch" not in f.filename
        ]
        return " <- ".join(reversed(frames[-4:]))


class _Window:
    """The steps that are not logging steps, from the batch's transfer to the end of Lightning's work on the
    batch (its logger connector's per-batch metric updates, after every hook), each under a
    :class:`HostSyncCounter`
    (and, on a GPU, under ``torch.cuda.set_sync_debug_mode("error")``)."""

    def __init__(self, first_step: int = 1) -> None:
        self.first_step = first_step
        self.per_step: dict[int, Counter[str]] = {}
        self._mode: HostSyncCounter | None = None
        self._step = -1
        self._cuda = False

    def open(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if trainer.training and step >= self.first_step and (step + 1) % trainer.log_every_n_steps != 0:
            self._step, self._mode = step, HostSyncCounter()
            self._mode.__enter__()
            self._cuda = trainer.strategy.root_device.type == "cuda"
            if self._cuda:
                torch.cuda.set_sync_debug_mode("error")

    def close(self) -> None:
        if self._mode is not None:
            if self._cuda:
                torch.cuda.set_sync_debug_mode("default")
            self._mode.__exit__(None, None, None)
            self.per_step[self._step] = self._mode.calls
            self._mode = None


@pytest.fixture
def window(monkeypatch):
    """A :class:`_Window` over every training step of the ``train()`` calls in the test."""
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    win = _Window()
    transfer = DiffusionModule.transfer_batch_to_device
    step_metrics = _LoggerConnector.update_train_step_metrics

    def open_window(self, batch, device, dataloader_idx):
        win.open(self.trainer)
        return transfer(self, batch, device, dataloader_idx)

    def close_window(self):  # the last thing Lightning does for a batch (after on_batch_end's metric updates)
        step_metrics(self)
        win.close()

    monkeypatch.setattr(DiffusionModule, "transfer_batch_to_device", open_window)
    monkeypatch.setattr(_LoggerConnector, "update_train_step_metrics", close_window)
    yield win
    win.close()


def _poison_at(monkeypatch, steps: set[int]) -> list[int]:
    """NaN in the first gradient at the given optimizer steps (after backward, before the optimizer step)."""
    seen: list[int] = []
    after_backward = DiffusionModule.on_after_backward

    def poison(self):
        after_backward(self)
        seen.append(self.global_step)
        if self.global_step in steps:
            next(self.model.parameters()).grad.fill_(float("nan"))

    monkeypatch.setattr(DiffusionModule, "on_after_backward", poison)
    return seen


def _extra_callbacks(monkeypatch, *callbacks: pl.Callback) -> None:
    """``train()`` runs these callbacks after its own."""
    own = train_module._callbacks
    monkeypatch.setattr(train_module, "_callbacks", lambda cfg: own(cfg) + list(callbacks))


def _logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of ``key`` in the run's CSV log."""
    (path,) = Path(run_dir).glob("**/metrics.csv")
    with open(path) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _default_run(make_cfg, *overrides: str):
    return make_cfg(
        "model=unet_tiny",
        "callbacks=default",
        "callbacks.sample_grid=null",
        "callbacks.model_checkpoint.every_n_train_steps=100",
        "trainer.enable_progress_bar=true",
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        "trainer.val_check_interval=100",
        *overrides,
    )


def _assert_no_waits(window: _Window, device: str = "cpu") -> None:
    expected = [s for s in range(window.first_step, MAX_STEPS) if (s + 1) % LOG_EVERY != 0]
    assert sorted(window.per_step) == expected, "the window saw every step that is not a logging step"
    waits = {s: dict(c) for s, c in window.per_step.items() if c}
    assert not waits, f"{device}: host waits inside training steps that are not logging steps: {waits}"


# -------------------------------------------------------------------------------------- the proof


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_no_host_sync_between_logging_steps(make_cfg, monkeypatch, window, policy):
    """Zero host reads over every step that is not a logging step; under skip one of them is non-finite
    (skipped on the device, also without a read). The logging steps still log the grad norm, the throughput
    and the skip count."""
    monkeypatch.setenv("DIFFUSION_LAB_PROGRESS", "1")  # the progress bar is drawn (it reads the loss)
    seen = _poison_at(monkeypatch, {NAN_STEP} if policy == "skip" else set())
    result = train(_default_run(make_cfg, f"nan_policy={policy}"))
    assert len(seen) == MAX_STEPS
    _assert_no_waits(window)
    out = Path(result["output_dir"])
    assert sorted(_logged(out, "train/grad_norm")) == [4, 9], "the grad norm at logging steps only"
    assert list(_logged(out, "train/device/samples_per_sec")) == [9], "images/s from the second logging step"
    if policy == "skip":
        assert _logged(out, "train/skipped_steps") == {4: 0.0, 9: 1.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_no_host_sync_between_logging_steps_on_cuda(make_cfg, monkeypatch, window, policy):
    """The same run on a GPU (bf16, the gpu trainer without compile), every step that is not a logging step
    under ``torch.cuda.set_sync_debug_mode("error")``: any host wait raises inside the step."""
    monkeypatch.setenv("DIFFUSION_LAB_PROGRESS", "1")
    _poison_at(monkeypatch, {NAN_STEP} if policy == "skip" else set())
    train(_default_run(make_cfg, "trainer=gpu", "compile=false", f"nan_policy={policy}"))
    _assert_no_waits(window, "cuda")


def test_run_resumed_from_a_checkpoint_without_fused_steps_steps_fused(make_cfg, window):
    """A checkpoint of a run whose optimizer was not fused (``optimizer.fused=false``, or written before it
    was the default) resumes with the fused step, so the resumed steps wait for nothing either (torch's
    load_state_dict would otherwise take the saved groups' switches)."""
    window.first_step = MAX_STEPS  # nothing counted in the first run
    first = train(_default_run(make_cfg, "+optimizer.fused=false", "trainer.max_steps=3"))
    assert first["last_checkpoint"]
    window.first_step = 4  # the resumed run starts at step 3
    train(_default_run(make_cfg, "nan_policy=skip", f"ckpt_path={first['last_checkpoint']}"))
    _assert_no_waits(window)


# ------------------------------------------------------------------- the guard's guarantees, kept


class _Snapshot(pl.Callback):
    """Weights and optimizer state before and after optimizer step ``step``, and after the steps around it."""

    def __init__(self, step: int):
        self.step = step
        self.states: dict[str, tuple[dict, dict]] = {}

    @staticmethod
    def _take(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict, dict]:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        optim = trainer.optimizers[0]
        state = {
            (i, k): v.detach().clone()
            for i, p in enumerate(optim.param_groups[0]["params"])
            for k, v in optim.state.get(p, {}).items()
            if torch.is_tensor(v)
        }
        return weights, state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in (self.step - 1, self.step, self.step + 1):
            self.states[f"before {trainer.global_step}"] = self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in (self.step - 1, self.step, self.step + 1):
            self.states[f"after {trainer.global_step - 1}"] = self._take(trainer, pl_module)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_skipped_step_leaves_weights_and_optimizer_state_bit_identical(make_cfg, monkeypatch, window):
    snap = _Snapshot(NAN_STEP)
    _extra_callbacks(monkeypatch, snap)
    _poison_at(monkeypatch, {NAN_STEP})
    result = train(_default_run(make_cfg, "nan_policy=skip", "model=mlp", "optimizer.weight_decay=0.1"))
    for step, changes in ((NAN_STEP - 1, True), (NAN_STEP, False), (NAN_STEP + 1, True)):
        (w0, s0), (w1, s1) = snap.states[f"before {step}"], snap.states[f"after {step}"]
        assert len(s0) > 0 and s0.keys() == s1.keys()
        weights_same, state_same = _same(w0, w1), _same(s0, s1)
        if changes:
            assert not weights_same and not state_same, f"a finite step {step} moves weights and Adam's state"
        else:
            assert weights_same, "the skipped step changed a weight"
            assert state_same, "the skipped step changed the optimizer state (moments or step count)"
    assert _logged(Path(result["output_dir"]), "train/skipped_steps") == {4: 0.0, 9: 1.0}
    _assert_no_waits(window)


def test_stop_comes_at_the_next_save_in_one_line_and_keeps_the_last_finite_checkpoint(make_cfg, monkeypatch):
    """A NaN gradient at step 6 (not a logging step), checkpoints every 2 steps: the save after step 7 reads
    the verdict and raises instead of writing, so last.ckpt is the one of step 6 (finite)."""
    from diffusion_lab.training.guards import NonFiniteError

    _poison_at(monkeypatch, {NAN_STEP})
    cfg = _default_run(make_cfg, "model=mlp", "callbacks.model_checkpoint.every_n_train_steps=2")
    with pytest.raises(NonFiniteError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert (
        message.startswith("non-finite gradient (model.")
        and f") at step {NAN_STEP}; training stopped" in message
    )
    ckpts = list(Path(cfg.paths.output_dir).glob("checkpoints/*.ckpt"))
    assert [p.name for p in ckpts] == ["last.ckpt"]
    ckpt = torch.load(ckpts[0], weights_only=True)
    assert ckpt["global_step"] == NAN_STEP, "the last checkpoint written is the one before the NaN step"
    tensors = [*ckpt["state_dict"].values(), *ckpt["current_model_state"].values()]
    for state in ckpt["optimizer_states"][0]["state"].values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    assert all(torch.isfinite(t.float()).all() for t in tensors)


def test_stop_without_checkpoints_comes_when_training_ends(make_cfg, monkeypatch):
    """No logging step and no checkpoint after the NaN step: the error comes when training ends, naming it."""
    from diffusion_lab.training.guards import NonFiniteError

    seen = _poison_at(monkeypatch, {1})
    with pytest.raises(
        NonFiniteError, match=r"^non-finite gradient \(model\.[\w.]+\) at step 1; training stopped"
    ):
        train(make_cfg("trainer.max_steps=3", "trainer.log_every_n_steps=50"))
    assert seen == [0, 1, 2], "the steps after it ran (frozen on the device)"


# ---------------------------------------------------------------------------------- the pieces


def test_log_steps_are_lightnings(make_cfg, monkeypatch):
    """``is_log_step`` agrees with Lightning's own decision before every optimizer step, also under gradient
    accumulation; the latch is taken at the batch that ended a logging step, and only there."""
    from diffusion_lab.training.host_sync import LogStepLatch, is_log_step

    checks: list[tuple[int, bool, bool]] = []
    taken: list[int] = []

    class Check(pl.Callback):
        latch = LogStepLatch()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lightning = trainer._logger_connector.should_update_logs
            checks.append((trainer.global_step, is_log_step(trainer), lightning))
            self.latch.note(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.latch.take():
                taken.append(batch_idx)

    _extra_callbacks(monkeypatch, Check())
    train(make_cfg("trainer.max_steps=7", "trainer.log_every_n_steps=3", "trainer.accumulate_grad_batches=2"))
    assert len(checks) == 7 and all(ours == lightning for _, ours, lightning in checks), checks
    assert [step for step, ours, _ in checks if ours] == [2, 5]
    assert taken == [5, 11], "the second batch of optimizer steps 2 and 5"


def test_throughput_waits_for_the_device_at_logging_steps_only(make_cfg, monkeypatch):
    from diffusion_lab.training import throughput

    synced: list[tuple[int, bool]] = []
    monkeypatch.setattr(
        throughput,
        "synchronize",
        lambda device: synced.append((trainer_ref[0].global_step, trainer_ref[0].validating)),
    )
    trainer_ref: list[pl.Trainer] = []

    class Ref(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            trainer_ref.append(trainer)

    _extra_callbacks(monkeypatch, Ref())
    result = train(
        make_cfg(
            "callbacks=default",
            "callbacks.sample_grid=null",
            "callbacks.progress_bar=null",
            "trainer.max_steps=12",
            "trainer.log_every_n_steps=5",
            "trainer.val_check_interval=6",
        )
    )
    # the fit's start, logging steps 5 and 10, around the validations after steps 6 and 12
    assert synced == [(0, False), (5, False), (6, True), (6, True), (10, False), (12, True), (12, True)], (
        synced
    )
    out = Path(result["output_dir"])
    assert _logged(out, "train/samples") == {4: 5 * 64.0, 9: 10 * 64.0}
    assert list(_logged(out, "train/device/samples_per_sec")) == [9]


# ------------------------------------------------------------------------------------------ DDP


def test_ddp_ranks_take_the_same_verdict(tmp_path, run_command):
    """2 gloo processes, a NaN gradient on rank 1 only at step 2 (after the all-reduce): under skip both
    ranks skip it (the verdict is all-reduced on the device) and end with the same weights; under stop both
    stop with the one-line error."""
    args = [
        "dataset=digits",
        "dataset.image_size=8",
        "model=mlp",
        "model.hidden_dim=32",
        "model.num_layers=1",
        "logger=csv",
        "callbacks=none",
        "print_config=false",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=3",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "+callbacks.nan._target_=nan_rank_callback.NanOnRank",
        "+callbacks.nan.step=2",
        "+callbacks.nan.rank=1",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    skip = run_command(
        "train.py",
        [*args, "nan_policy=skip", f"paths.log_dir={tmp_path}/skip", f"+callbacks.nan.out={tmp_path}/w"],
        tmp_path,
        env=env,
        timeout=400,
    )
    assert skip.returncode == 0, skip.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / "w" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert _same(w0, w1), "the ranks' weights differ: they took different verdicts"
    assert all(torch.isfinite(v).all() for v in w0.values())
    (run,) = (tmp_path / "skip" / "train" / "runs").iterdir()
    assert _logged(run, "train/skipped_steps") == {2: 1.0, 5: 1.0}

    stop = run_command(
        "train.py",
        [*args, f"paths.log_dir={tmp_path}/stop", f"+callbacks.nan.out={tmp_path}/s"],
        tmp_path,
        env=env,
        timeout=400,
    )
    assert stop.returncode == 1, stop.stderr[-3000:]
    assert "Traceback" not in stop.stderr
    errors = [line for line in stop.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(e.startswith("error: non-finite gradient (model.") for e in errors), stop.stderr[
        -3000:
    ]
    assert all("at step 2; training stopped" in e for e in errors)
