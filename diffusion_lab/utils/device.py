"""GPU runtime settings of a training run, and the ``compile`` switch of the backbone.

``configure_gpu``: on a CUDA device fp32 matrix products may use TF32 on the tensor cores
(``torch.set_float32_matmul_precision("high")``): torch keeps "highest" (full fp32 through cuBLAS) by
default, while its fp32 convolutions already run in TF32 (``torch.backends.cudnn.allow_tf32``). Under
bf16-mixed the products are bf16 anyway; the setting speeds up 32-true runs and what autocast keeps in fp32.
A precision the user has set (anything but torch's default) is left alone, and nothing changes on a CPU.

``compile_options``: the config's ``compile`` is ``false``, ``true`` (inductor's default mode) or the name of
a ``torch.compile`` mode: ``reduce-overhead`` replays the compiled forward and backward as CUDA graphs (one
launch per graph instead of hundreds of kernels: the eager U-Net step is launch-bound), which wants static
shapes (the training batches are all full: ``ResumableBatches``) and costs a graph per distinct input shape
(validation and sample-grid batches add theirs); ``max-autotune`` also benchmarks GEMM / convolution kernels
while compiling (minutes more), ``max-autotune-no-cudagraphs`` the same without graphs.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["COMPILE_MODES", "compile_options", "configure_gpu"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(value: Any) -> dict[str, str] | None:
    """The config's ``compile`` value -> None (no compile) or the keywords of ``Module.compile``.

    ``false`` / ``true`` (also the strings "false" / "true") or a mode of :data:`COMPILE_MODES`; anything else
    is a one-line ValueError naming the choices.
    """
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value is None or isinstance(value, bool):
        return {} if value else None
    if isinstance(value, str) and value in COMPILE_MODES:
        return {} if value == "default" else {"mode": value}
    raise ValueError(
        f"compile={value!r}: choose false, true or a torch.compile mode ({', '.join(COMPILE_MODES)})"
    )


def configure_gpu(device: torch.device | str, matmul_precision: str = "high") -> dict[str, str]:
    """Set the process-wide GPU settings of a run on ``device``; returns what it changed (empty on a CPU).

    ``matmul_precision``: ``torch.set_float32_matmul_precision``'s value, applied only while torch's default
    ("highest") is in place.
    """
    if torch.device(device).type != "cuda":
        return {}
    changed = {}
    if torch.get_float32_matmul_precision() == "highest" and matmul_precision != "highest":
        torch.set_float32_matmul_precision(matmul_precision)
        changed["float32_matmul_precision"] = matmul_precision
    return changed
