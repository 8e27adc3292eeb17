"""The first screen of a run shows the run, not third-party notices: Lightning's litlogger / litmodels
advertisements and its LeafSpec deprecation warning are silenced where they arise."""

from __future__ import annotations

from conftest import FAST

NOTICES = ("litlogger", "litmodels", "💡 Tip", "LeafSpec")


def test_a_training_run_prints_no_third_party_notices(tmp_path, run_command):
    args = [*FAST, "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks=none"]
    r = run_command(
        "train.py", [*args, f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"], tmp_path
    )
    shown = r.stdout + r.stderr
    assert r.returncode == 0, shown[-3000:]
    assert "run directory: " in shown, "the run's own lines are still there"
    for text in NOTICES:
        assert text not in shown, f"{text!r} on the first screen:\n{shown[-3000:]}"
