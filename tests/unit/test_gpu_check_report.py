"""The arithmetic of ``make gpu-check``: FLOPs per image, MFU against the run's own peak, the failure list."""

from __future__ import annotations

from torch import nn

from experiments.gpu_check.report import add_mfu, failures, to_markdown
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
    row = {"setup": "trainer=gpu", "bf16": True, "achieved_tflops": 100.0, "images_per_s": 1.0}
    row32 = {"setup": "fp32 eager", "bf16": False, "achieved_tflops": 50.0, "images_per_s": 1.0}
    return {
        "command": "python -m experiments.gpu_check",
        "device": "cuda",
        "tiny": False,
        "started": "now",
        "wall_seconds": 1,
        "sections": {
            "env": {
                "status": "ok",
                "checks": {},
                "peak_tflops": {"bf16": 800.0, "tf32": 400.0, "fp32": 50.0},
            },
            "speed_unet_cifar": {"status": "ok", "checks": {"finite": True}, "rows": [row32, row]},
            "training": {
                "status": "failed",
                "checks": {"loss falls": False},
                "check_details": {"loss falls": [1, 2]},
            },
            "ddp": {"status": "timeout", "error": "timed out after 90 s", "checks": {}},
        },
    }


def test_mfu_against_the_peak_of_the_rows_precision():
    r = _results()
    add_mfu(r)
    fp32, bf16 = r["sections"]["speed_unet_cifar"]["rows"]
    assert bf16["mfu_pct"] == 12.5  # 100 / 800 (bf16 peak)
    assert fp32["mfu_pct"] == 12.5  # 50 / 400 (tf32 peak: cuDNN's fp32 convolutions)


def test_failures_name_failed_checks_and_timeouts():
    r = _results()
    assert failures(r) == ["training: check failed: loss falls ([1, 2])", "ddp: timed out after 90 s"]
    r["failures"] = failures(r)
    md = to_markdown(r)
    assert "- ddp: timed out after 90 s" in md and "| speed_unet_cifar | ok |" in md
