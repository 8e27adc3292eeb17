"""diffusion_lab: denoising diffusion models on PyTorch Lightning and Hydra."""

from diffusion_lab.utils.cpu import configure_cpu as _configure_cpu
from diffusion_lab.utils.cpu import register_resolvers as _register_resolvers

# Before anything imports torch: OpenMP's threads sleep at barriers instead of spinning (see cpu.py).
_configure_cpu(warn=False)
# ${cpu_precision:} in conf/trainer/cpu.yaml: bf16-mixed only on a CPU with bf16 units.
_register_resolvers()
