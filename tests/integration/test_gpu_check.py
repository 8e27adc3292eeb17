"""``make gpu-check`` stays runnable while no GPU is at hand: every section's code path at toy sizes on the
CPU; the time budget skips what does not fit, with the reason; results.json is whole after every section."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

import experiments.gpu_check.__main__ as gpu_check
from experiments.gpu_check.__main__ import SECTIONS


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path, run_command):
    """Every section runs, none fails, and the results say what they measured. In one process but ddp
    (``--in-process``: the per-section processes are tested by the killed-run and failing-section tests)."""
    out = tmp_path / "out"
    r = run_command(
        "experiments.gpu_check",
        ["--device", "cpu", "--tiny", "--in-process", "--out", str(out)],
        REPO,
        timeout=1200,
    )
    results = json.loads((out / "results.json").read_text())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert results["failures"] == [], results["failures"]
    s = results["sections"]
    assert list(s) == list(SECTIONS)
    assert all(sec["status"] == "ok" for sec in s.values()), {n: v.get("error") for n, v in s.items()}
    assert s["env"]["peak_tflops"]["fp32"] > 0
    assert s["env"]["group_norm"]["autocast_dtype"]["unet.GroupNorm"] == "torch.bfloat16"
    rt = s["roundtrip"]
    assert [row["precision"] for row in rt["rows"]] == ["32-true", "bf16-mixed"]
    assert set(rt["samples"]) == {"fp32", "bf16 autocast", "bf16 weights"} and all(rt["checks"].values())
    eager = s["eager_unet_cifar"]["rows"]
    assert [row["setup"] for row in eager] == [
        "fp32 NCHW",
        "fp32 NHWC",
        "bf16 NCHW, fp32 norm",
        "bf16 NHWC, fp32 norm",
        "bf16 NCHW, bf16 norm",
        "bf16 NHWC, bf16 norm",
    ]
    for row in eager + s["overhead"]["rows"] + s["dit"]["rows"]:  # the timed-row protocol everywhere
        assert row["images_per_s"] > 0 and row["mfu_pct"] > 0
        assert len(row["ms_repeats"]) == 3 and row["syncs_in_timed_loop"] >= 0, row
    assert "top_ops" in s["eager_unet_cifar"]["profiles"]["bf16 NHWC, bf16 norm"]
    ov = s["overhead"]
    assert [row["setup"].split(" (")[0].split(",")[0] for row in ov["rows"]] == [
        "train()",
        "bare compiled step",
        "bare step",
    ]
    assert ov["rows"][1]["graphs_compiled_again"] == 0  # the bare step reuses train()'s compiled graphs
    assert isinstance(ov["framework_overhead_pct"], float)
    sy = s["syncs"]
    assert sy["steps_counted"]["plain"] > 0 and sy["steps_counted"]["log"] > 0
    assert [row["model"] for row in s["dit"]["rows"]] == ["dit_s2", "dit_b2"]
    samp = s["sampling"]["rows"]
    assert {row["precision"] for row in samp} == {
        "fp32",
        "bf16 autocast",
        "bf16 weights",
        "bf16 weights, NHWC",
    }
    assert {row["nfe"] for row in samp} == {4, 5}  # --tiny: DPM-Solver++ 4 steps, Heun 3
    assert s["fid"]["fid_classifier_real_vs_real"] < s["fid"]["fid_classifier_noise_vs_real"]
    assert s["ddp"]["world_size"] == 2
    md = (out / "results.md").read_text()
    assert "## Failures\n\nnone" in md and "## Targets (issue 35)" in md and "DPM-Solver++(2M) 20" in md


def test_a_budget_too_small_skips_every_section_with_the_reason(tmp_path, run_command):
    out = tmp_path / "out"
    r = run_command(
        "experiments.gpu_check", ["--device", "cpu", "--tiny", "--budget-s", "1", "--out", str(out)], REPO
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["budget_s"] == 1.0 and list(results["sections"]) == list(SECTIONS)
    for sec in results["sections"].values():
        assert sec["status"] == "skipped" and sec["reason"].startswith("time budget:"), sec
    assert "the section needs about" in (out / "results.md").read_text()


def test_the_budget_cuts_from_the_end_and_json_is_written_after_each_section(tmp_path, monkeypatch):
    """With a fake clock: each section takes 100 s; a 205 s budget runs env and roundtrip, then skips the rest
    (5 s left, recorded), and results.json holds exactly the sections finished so far at every moment."""
    clock = {"t": 0.0}
    seen = []

    def fake_child(name, args, limit):
        seen.append((name, json.loads((tmp_path / "out" / "results.json").read_text())))
        clock["t"] += 100.0
        return {"status": "ok", "checks": {}, "wall_seconds": 100.0, "limit": limit}

    monkeypatch.setattr(gpu_check, "_child", fake_child)
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock["t"])
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "205", "--out", str(tmp_path / "out")])
    assert rc == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [n for n, _ in seen] == ["env", "roundtrip"]
    # what results.json said while each section ran: the sections before it, and the one running
    assert seen[0][1]["running"] == "env" and seen[0][1]["sections"] == {}
    assert seen[1][1]["running"] == "roundtrip" and list(seen[1][1]["sections"]) == ["env"]
    s = results["sections"]
    assert s["env"]["limit"] == SECTIONS["env"].cpu_limit and s["roundtrip"]["limit"] == 105  # 205 - 100 left
    for name in list(SECTIONS)[2:]:
        assert s[name]["status"] == "skipped" and "5 s left of 205" in s[name]["reason"], (name, s[name])
    assert results["running"] is None


def test_a_killed_run_leaves_a_valid_json_with_the_finished_sections(tmp_path):
    """Kill the whole run (SIGKILL to its process group) while its second section runs: results.json parses
    and holds the first section, finished, and names the one that was running."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "experiments.gpu_check", "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.Popen(
        cmd + ["--only", "env", "roundtrip"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                results = json.loads((out / "results.json").read_text())
            except (OSError, ValueError):
                results = {}
            if results.get("running") == "roundtrip":
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the second section never started")
        time.sleep(2)  # inside the roundtrip section
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    results = json.loads((out / "results.json").read_text())
    assert results["running"] == "roundtrip"
    assert results["sections"]["env"]["status"] == "ok" and "roundtrip" not in results["sections"]
    assert not list(out.glob("*.tmp"))  # no half-written file left beside it


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_records_a_failing_section(tmp_path, run_command):
    """--device cuda without a GPU: the section's error is recorded in one line, the run exits 1, and the
    sections after it still run."""
    out = tmp_path / "out"
    r = run_command(
        "experiments.gpu_check", ["--device", "cuda", "--out", str(out), "--only", "env", "dit"], REPO
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    env = results["sections"]["env"]
    assert env["status"] == "error"
    assert env["error"] == "RuntimeError: --device cuda but torch.cuda.is_available() is False"
    assert "dit" in results["sections"]  # ran after the failure
    assert results["failures"][0].startswith("env: RuntimeError")
    assert "env: RuntimeError" in (out / "results.md").read_text()
