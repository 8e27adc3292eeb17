"""The arithmetic of ``make gpu-check``: FLOPs per image, MFU against the run's own peak, the failure list."""

from __future__ import annotations

from torch import nn

from experiments.gpu_check.report import add_mfu, failures, targets, to_markdown
from experiments.gpu_check.speed import forward_flops


class _Linear(nn.Module):
    """model(x, t) = W flatten(x): 2 * in * out FLOPs per image (a multiply and an add per weight)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x, t):
        return self.lin(x.flatten(1))


def test_forward_flops_of_a_linear_map():
    assert forward_flops(_Linear(3 * 4 * 4, 10), (3, 4, 4), "cpu") == 2 * 48 * 10


def _results():
    row = {"setup": "bare compiled step", "bf16": True, "achieved_tflops": 100.0, "ms_per_step": 1.0}
    row32 = {
        "setup": "fp32 NCHW",
        "bf16": False,
        "achieved_tflops": 50.0,
        "images_per_s": 10.0,
        "ms_per_step": 1,
    }
    row16 = {"setup": "bf16 NHWC, bf16 norm", "bf16": True, "achieved_tflops": 80.0, "images_per_s": 13.0}
    row16["ms_per_step"] = 1
    return {
        "command": "python -m experiments.gpu_check",
        "device": "cuda",
        "tiny": False,
        "started": "now",
        "wall_seconds": 1,
        "budget_s": 400,
        "sections": {
            "env": {
                "status": "ok",
                "checks": {},
                "peak_tflops": {"bf16": 800.0, "tf32": 400.0, "fp32": 50.0},
            },
            "eager_unet_cifar": {"status": "ok", "checks": {"finite": True}, "rows": [row32, row16]},
            "overhead": {"status": "ok", "checks": {}, "rows": [row], "framework_overhead_pct": 12.5},
            "roundtrip": {
                "status": "failed",
                "checks": {"loss falls": False},
                "check_details": {"loss falls": [1, 2]},
            },
            "ddp": {"status": "timeout", "error": "timed out after 90 s", "checks": {}},
            "dit": {"status": "skipped", "reason": "time budget: 3 s left of 400", "checks": {}},
        },
    }


def test_mfu_against_the_peak_of_the_rows_precision():
    r = _results()
    add_mfu(r)
    fp32, bf16 = r["sections"]["eager_unet_cifar"]["rows"]
    assert bf16["mfu_pct"] == 10.0  # 80 / 800 (bf16 peak)
    assert fp32["mfu_pct"] == 12.5  # 50 / 400 (tf32 peak: cuDNN's fp32 convolutions)
    assert r["sections"]["overhead"]["rows"][0]["mfu_pct"] == 12.5  # 100 / 800
    # a toy row against a large peak keeps three significant digits instead of rounding to 0.0
    toy = _results()
    toy["sections"]["eager_unet_cifar"]["rows"][1]["achieved_tflops"] = 0.0123
    add_mfu(toy)
    assert toy["sections"]["eager_unet_cifar"]["rows"][1]["mfu_pct"] == 0.00154  # 0.0123 / 800


def test_targets_say_measured_met_or_not_measured():
    r = _results()
    add_mfu(r)
    t = {x["target"]: x for x in targets(r)}
    assert t["train() step vs the bare compiled step"]["met"] is False  # +12.5% > 10%
    assert t["unet_cifar compiled bf16, share of the bf16 peak"]["measured"] == "12.5%"
    assert t["unet_cifar bf16 eager vs fp32 eager (best layouts)"]["measured"] == "1.3x"
    assert t["unet_cifar bf16 eager vs fp32 eager (best layouts)"]["met"] is True
    assert t["DiT-B/2 compiled bf16, share of the bf16 peak"]["met"] is None  # skipped: not measured


def test_failures_name_failed_checks_and_timeouts():
    r = _results()
    assert failures(r) == ["roundtrip: check failed: loss falls ([1, 2])", "ddp: timed out after 90 s"]
    r["failures"] = failures(r)
    md = to_markdown(r)
    assert "- ddp: timed out after 90 s" in md and "| eager_unet_cifar | ok |" in md
    assert "**dit: skipped**: time budget: 3 s left of 400" in md
    assert "| unet_cifar bf16 eager vs fp32 eager (best layouts) | >= 1.2x | 1.3x | yes |" in md
