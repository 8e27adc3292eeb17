"""``make gpu-check`` stays runnable while no GPU is at hand: the same sections at toy sizes on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from experiments.gpu_check.__main__ import SECTIONS


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path, run_command):
    """Every section runs (each in its own process), none fails, and the results say what they measured."""
    out = tmp_path / "out"
    r = run_command(
        "experiments.gpu_check", ["--device", "cpu", "--tiny", "--out", str(out)], REPO, timeout=900
    )
    results = json.loads((out / "results.json").read_text())
    assert set(results["sections"]) == set(SECTIONS)
    assert results["failures"] == [], results["failures"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = results["sections"]
    for name, sec in s.items():
        expected = (
            {"skipped"} if name == "ddp_compile" else {"ok", "skipped"} if name == "speed_dit" else {"ok"}
        )
        assert sec["status"] in expected, (name, sec.get("error"))
    assert s["env"]["peak_tflops"]["fp32"] > 0
    for model in ("unet_small", "unet_cifar"):
        rows = [row for row in s[f"speed_{model}"]["rows"] if "images_per_s" in row]
        assert [row["setup"] for row in rows] == ["fp32 eager", "bf16 eager", "bf16 eager + fused AdamW"]
        assert all(row["images_per_s"] > 0 and row["mfu_pct"] > 0 for row in rows)
    t = s["training"]
    assert t["global_step"] == t["steps"] and t["loss_last_fifth"] < t["loss_first_fifth"]
    assert all(t["checks"].values()) and len(t["checks"]) >= 6
    assert {row["nfe"] for row in s["sampling"]["rows"]} == {4, 5}  # --tiny: DPM-Solver++ 4 steps, Heun 3
    assert s["fid"]["fid_classifier_real_vs_real"] < s["fid"]["fid_classifier_noise_vs_real"]
    assert s["ddp"]["world_size"] == 2
    md = (out / "results.md").read_text()
    assert "## Failures\n\nnone" in md and "DPM-Solver++(2M) 20" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_records_a_failing_section(tmp_path, run_command):
    """--device cuda without a GPU: the section's error is recorded in one line, the run exits 1, and the
    sections after it still run."""
    out = tmp_path / "out"
    r = run_command(
        "experiments.gpu_check", ["--device", "cuda", "--out", str(out), "--only", "env", "speed_dit"], REPO
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    env = results["sections"]["env"]
    assert env["status"] == "error"
    assert env["error"] == "RuntimeError: --device cuda but torch.cuda.is_available() is False"
    assert "speed_dit" in results["sections"]  # ran after the failure
    assert results["failures"][0].startswith("env: RuntimeError")
    assert "env: RuntimeError" in (out / "results.md").read_text()
