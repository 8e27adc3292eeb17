"""``make gpu-check``: the GPU path proven on a GPU in one call of about 8 minutes of device time (start-up
included), and kept runnable on the CPU with ``--tiny`` (the test suite runs every section that way).

    python -m experiments.gpu_check [--device cuda|cpu] [--tiny] [--out DIR] [--budget-s SECONDS] [--only ...]

Sections, in order of priority, each in its own subprocess with its own time limit, so that a failure, a hang
or a broken CUDA context in one is recorded (status and the error's first line) while the others still run;
a section that would not fit in what is left of the budget is skipped, the reason recorded:

    env               GPU, memory, versions; measured bf16, tf32 and fp32 matmul peaks; whether GroupNorm
                      keeps NHWC on this build, its dtype under autocast, the U-Net's bf16 GroupNorm against
                      fp64
    roundtrip         bf16-mixed against 32-true through train() (the loss curves agree); the bf16 checkpoint
                      through load_module(map_location=device) and sampled in bf16 (autocast and bf16 weights)
    eager_unet_cifar  unet_cifar eager {fp32, bf16} x {NCHW, NHWC}, bf16 with torch's fp32 GroupNorm and with
                      the U-Net's bf16 GroupNorm; the profiler over the bf16 rows in runs of their own
    overhead          the real train() path (trainer=gpu: compiled, bf16, NHWC) against the bare compiled step
                      of the same module and batch; the bare step with CUDA graphs (reduce-overhead)
    syncs             host syncs per training step of train(), by call site, logging steps apart
    dit               DiT-S/2 and DiT-B/2 compiled, bf16-mixed
    sampling          DPM-Solver++ 20 (and Heun 18 with churn) in fp32, bf16 autocast, bf16 weights (NCHW,
                      NHWC)
    fid, ddp          (when time is left) the FID plumbing on the device; trainer=ddp on every visible GPU

Every timed row: the first step alone; warm-up untimed; three repeats of at least ten steps between two
synchronisations, by CUDA events and the host clock (flagged past 3%); first-step, steady and reserved memory
apart; host syncs inside the timed loop counted (common.time_steps). Results: ``results.json`` and
``results.md`` in ``--out``, written whole at the start and after every section.
"""
