"""Datasets and the DataModule: decoded once into uint8 tensors, cached on disk, batched from memory.

``DiffusionDataModule(name=...)`` serves every dataset; ``conf/dataset/<name>.yaml`` configures it.
Readers of the original formats (MNIST IDX, Hoda CDB digits and CDB 5.0 letters) are usable on their own.
"""

from diffusion_lab.data.cdb import read_cdb
from diffusion_lab.data.datamodule import SOURCES, DiffusionDataModule, TensorBatches
from diffusion_lab.data.errors import CorruptDataError, MissingDataError
from diffusion_lab.data.mnist import read_idx

__all__ = [
    "DiffusionDataModule",
    "TensorBatches",
    "SOURCES",
    "MissingDataError",
    "CorruptDataError",
    "read_idx",
    "read_cdb",
]
