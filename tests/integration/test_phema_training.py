"""Post-hoc EMA in real (tiny) trainings: snapshots survive a kill and a resume, the disk bound holds, and the
reconstructed checkpoint is read by ``sample``."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from diffusion_lab.training.phema import list_snapshots


def _cli(root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "dataset=digits",
        "dataset.image_size=8",
        "model=mlp",
        "model.hidden_dim=32",
        "model.num_layers=2",
        "logger=csv",
        "callbacks=phema",
        "callbacks.sample_grid=null",
        "callbacks.progress_bar=null",
        "callbacks.best_checkpoint=null",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.phema.every_n_steps=2",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "schedule.timesteps=50",
        "print_config=false",
        "seed=7",
        f"paths.log_dir={root}",
        f"paths.cache_dir={root.parent}/cache",
        "trainer.deterministic=true",
        "dataset.batch_size=16",
        *extra,
    ]


def _snapshots(root: Path) -> dict[int, dict]:
    """The snapshots of the newest run under ``root`` (a resumed run writes a new run folder)."""
    folder = max(root.glob("train/runs/*/phema"), key=lambda p: p.parent.stat().st_mtime)
    return {s: torch.load(p, weights_only=True) for s, p in list_snapshots(folder)}


def test_snapshots_survive_kill_and_resume(tmp_path, run_command):
    """Straight run of 12 steps vs a run killed (SIGKILL) at step 7 (last checkpoint at 4) and resumed to 12:
    the same snapshot steps, bitwise equal profiles; then the reconstruction command writes a checkpoint
    that ``sample`` reads, with the reconstructed weights as its EMA weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_command("train.py", _cli(a, 12), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    kill = ["+callbacks.kill._target_=kill_callback.KillAt", "+callbacks.kill.step=7"]
    r = run_command("train.py", _cli(b, 12, *kill), tmp_path, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert sorted(_snapshots(b)) == [2, 4, 6]  # 6 was written after the last checkpoint (4): dropped
    (ckpt,) = b.glob("train/runs/*/checkpoints/last.ckpt")
    r = run_command("train.py", _cli(b, 12, f"ckpt_path={ckpt}"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    sa, sb = _snapshots(a), _snapshots(b)
    assert sorted(sa) == sorted(sb) == [2, 4, 6, 8, 10, 12]
    for step in sa:
        for pa, pb in zip(sa[step]["profiles"], sb[step]["profiles"]):
            for k in pa:
                assert torch.equal(pa[k], pb[k]), f"profile weight {k} at step {step} differs after resume"

    (run_dir,) = a.glob("train/runs/*")
    (b_old,) = [p for p in b.glob("train/runs/*") if not (p / "phema" / "phema-step00000012.pt").exists()]
    assert sorted(s for s, _ in list_snapshots(b_old / "phema")) == [2, 4, 6]  # the stopped run's own
    out = tmp_path / "phema.ckpt"
    r = run_command("diffusion_lab.phema", [f"run_dir={run_dir}", "sigma_rel=0.08", f"out={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = torch.load(out, weights_only=True)
    assert rec["phema"]["sigma_rel"] == 0.08 and rec["global_step"] == 12
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    k = next(k for k in sa[12]["profiles"][0])
    assert not torch.equal(rec["state_dict"][k], last["state_dict"][k])  # not the classic EMA
    assert torch.equal(rec["current_model_state"][k], last["current_model_state"][k])  # raw weights kept
    r = run_command(
        "diffusion_lab.sample",
        [f"ckpt={out}", "n=4", "sampler=ddim", "sampler.steps=5", "device=cpu", f"out={tmp_path / 's'}"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "s" / "samples.npz").is_file()
    r = run_command("diffusion_lab.phema", [f"run_dir={run_dir}", "sigma_rel=0.5"], tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: sigma_rel=0.5") and "Traceback" not in r.stderr


def test_snapshot_count_stays_within_bound_and_sweep_runs(make_cfg, tmp_path, digits_classifier):
    """max_snapshots=3, a snapshot every step for 16 steps: the period doubles, at most 3 + 1 files stay."""
    from diffusion_lab.train import train

    args = _cli(tmp_path, 16, "callbacks.phema.every_n_steps=1", "callbacks.phema.max_snapshots=3")
    train(make_cfg(*[a for a in args if not a.startswith("paths.")], fast=False))
    # period 1 -> 2 at step 4 (4 files), -> 4 at step 8 (2, 4, 6, 8), -> 8 at step 16 (4, 8, 12, 16)
    steps = [s for s, _ in list_snapshots(tmp_path / "run" / "phema")]
    assert steps == [8, 16]

    # the EMA-length sweep at toy size: one FID per sigma_rel, the classic EMA as reference, a best stated
    from experiments.phema_sweep import main as sweep

    args = ["--run-dir", str(tmp_path / "run"), "--classifier", str(digits_classifier), "--n", "16"]
    args += ["--sigma-rels", "0.05", "0.15", "--steps", "4", "--bpd-n", "8", "--out", str(tmp_path / "sweep")]
    result = sweep(args)
    assert [r["sigma_rel"] for r in result["rows"]] == [0.05, 0.15]
    fids = [r["fid_classifier"] for r in result["rows"]]
    assert result["meta"]["best_sigma_rel"] == [0.05, 0.15][fids.index(min(fids))]
    assert fids[0] != fids[1] and "bpd" in result["rows"][0]
    assert (tmp_path / "sweep" / "sweep.png").is_file() and (tmp_path / "sweep" / "table.md").is_file()
