"""Benchmarks behind README's "Performance" section (`make bench`, i.e. ``python -m experiments.bench``).

Every number is a median of interleaved repeats (A B C, B C A, ...) measured in one process run beside
the reference it is compared with, so ratios hold on a busy, shared machine where absolute numbers do not.
Sections (each a module here): peaks (large ``torch.mm``), training, numerics (fp32 vs bf16 curves),
threads (the two-thread stall, in worker processes), sampling (throughput and classifier FID), peer (the
same work in lucidrains' denoising-diffusion-pytorch), loader, dit (the Diffusion Transformer sizes: training
and sampling in fp32, bf16 and compiled, GFLOP per image, share of the matmul peaks).
Results: ``results.json`` + ``results.md``.
"""
