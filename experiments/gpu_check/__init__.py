"""``make gpu-check``: the GPU path (``trainer=gpu``: bf16-mixed, channels_last, torch.compile, fused AdamW)
proven on a GPU in one command of a few minutes, and kept runnable on the CPU with ``--tiny``.

    python -m experiments.gpu_check [--device cuda|cpu] [--tiny] [--out DIR] [--budget SECONDS]

Sections, each in its own subprocess with its own time limit, so that a failure, a hang or a broken CUDA
context in one is recorded (status and the error's first line) while the others still run:

    env              GPU, memory, torch / CUDA versions; measured fp32, tf32 and bf16 matmul peaks
    speed_<model>    training images/s of unet_small, unet_cifar (DDPM's CIFAR-10 net) and a DiT where one
                     exists: fp32 eager against trainer=gpu's switches; model FLOP utilisation vs the peaks
    training         an experiment=cifar10_ddpm-shaped run through train() and the Lightning Trainer on the
                     bundled digits (3x32x32): the loss falls, no NaN, the checkpoint round-trips and samples
    sampling         images/s of DPM-Solver++(2M) 20 steps and Heun 18 steps with churn at batch 256
    fid              the FID plumbing on the device: classifier features; Inception where its weights are
    ddp              trainer=ddp on every visible GPU (gloo on two CPU processes under --device cpu)

Results: ``results.json`` (every section, written after each one) and ``results.md`` in ``--out``.
"""
