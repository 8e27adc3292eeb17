"""Benchmarks behind README's "Performance" section (`make bench`, i.e. ``python -m experiments.bench``).

Every number is a median of interleaved repeats (A B C, B C A, ...) measured in one process run beside
the reference it is compared with, so ratios hold on a busy, shared machine where absolute numbers do not.
Sections (each a module here): peaks (large ``torch.mm``), training, numerics (fp32 vs bf16 curves),
threads (the two-thread stall, in worker processes), sampling (throughput and classifier FID), peer (the
same work in lucidrains' denoising-diffusion-pytorch), loader. Results: ``results.json`` + ``results.md``.
"""
