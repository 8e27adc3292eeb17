"""diffusion_lab: denoising diffusion models on PyTorch Lightning and Hydra."""

from diffusion_lab.cpu import configure_cpu as _configure_cpu

# Before anything imports torch: OpenMP's threads sleep at barriers instead of spinning (see cpu.py).
_configure_cpu(warn=False)
