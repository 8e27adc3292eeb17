"""One training-throughput measurement in a fresh process (OpenMP reads its settings once per process).

    python -m experiments.bench.worker {default|configured} THREADS SECONDS    (THREADS 0: train.py's default)

``default`` imports torch before diffusion_lab, so OpenMP starts with its own settings or the ones the
environment gives (as every run did before ``diffusion_lab.utils.cpu``);
``configured`` sets OpenMP's environment first (``configure_cpu``), as ``train.py`` does. Prints one
JSON line: images/s of unet_tiny at 32x32, batch 128, in the CPU trainer's precision (bf16-mixed only on a
CPU with bf16 units), and the OpenMP settings the worker started with.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(mode: str, threads: int, seconds: float) -> None:
    if mode == "default":
        import torch  # noqa: F401  (first: OpenMP keeps its own defaults)
    else:
        from diffusion_lab.utils.cpu import configure_cpu

        configure_cpu()  # before torch loads, as the commands do (importing diffusion_lab sets nothing)
    from diffusion_lab.utils.cpu import default_cpu_precision
    from experiments.bench.setups import TrainSetup, train_step

    if threads == 0:  # what train.py does when threads is null
        from diffusion_lab.utils.cpu import default_threads

        threads = default_threads()
    bf16 = default_cpu_precision() == "bf16-mixed"
    step, _ = train_step("unet_tiny", 32, TrainSetup(bf16=bf16, threads=threads))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += step()
    ips = n / (time.perf_counter() - start)
    omp = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    print(json.dumps({"images_per_s": ips, "threads": threads, "bf16": bf16, **omp}))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("default", "configured"):
        sys.exit("usage: python -m experiments.bench.worker {default|configured} THREADS SECONDS")
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
