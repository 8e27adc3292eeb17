"""Feature extractors as torchmetrics sees them: ``nn.Module``s mapping uint8 images to (N, d) tensors.

torchmetrics' ``FrechetInceptionDistance``, ``KernelInceptionDistance`` and ``InceptionScore`` accept any
``nn.Module`` as ``feature``: it is called on the very tensor passed to ``update`` and must return (N, d).
FID reads ``num_features`` (int) instead of running a dummy forward pass when the attribute exists.

One network usually feeds several metrics at once: FID and KID read its penultimate features, IS and the
class histogram its logits. A :class:`DualFeatureExtractor` computes all outputs of a batch in one forward
pass and remembers the last batch; :class:`FeatureView` hands one of those outputs to a metric. Updating
FID, KID and IS with the same batch tensor therefore costs one forward pass, not three.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DualFeatureExtractor", "FeatureView", "check_uint8_images", "to_rgb"]


def check_uint8_images(x: Tensor, what: str) -> None:
    """Refuse anything but uint8 (N, C, H, W) with C in {1, 3}: one line naming the problem and the fix."""
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{what}: expected uint8 images (N, C, H, W) with C in {{1, 3}}, got {got}; "
            "convert with diffusion_lab.utils.media.to_uint8(x, value_range=(-1, 1))"
        )


def to_rgb(x: Tensor) -> Tensor:
    """(N, 1, H, W) grey -> (N, 3, H, W) by repeating the channel; RGB passes through."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class DualFeatureExtractor(nn.Module):
    """Base class: ``outputs(x)`` returns a dict of named (N, d) outputs for uint8 images x (N, C, H, W).

    Subclasses implement ``compute_outputs`` and set ``output_dims`` (name -> d) and ``tag`` (a string naming
    the network and its weights, used as part of the real-statistics cache key).

    The last batch and its outputs are kept (by object identity, and the tensor's in-place version counter),
    so several metrics updated with the same tensor share one forward pass. Holding a reference to that
    tensor keeps its identity unique; :meth:`forget` drops it.
    """

    output_dims: dict[str, int]
    tag: str

    def __init__(self) -> None:
        super().__init__()
        self._last_input: Tensor | None = None
        self._last_version = -1
        self._last_outputs: dict[str, Tensor] = {}

    def compute_outputs(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def outputs(self, x: Tensor) -> dict[str, Tensor]:
        if x is not self._last_input or x._version != self._last_version:
            self._last_outputs = self.compute_outputs(x)
            self._last_input, self._last_version = x, x._version
        return self._last_outputs

    def forget(self) -> None:
        """Drop the remembered batch (frees its memory)."""
        self._last_input, self._last_version, self._last_outputs = None, -1, {}

    def view(self, output: str) -> FeatureView:
        if output not in self.output_dims:
            raise ValueError(
                f"{self.tag}: unknown output '{output}', choose one of {sorted(self.output_dims)}"
            )
        return FeatureView(self, output)


class FeatureView(nn.Module):
    """The ``feature`` module handed to torchmetrics: uint8 (N, C, H, W) -> ``extractor.outputs(x)[output]``.

    Attributes:
        num_features: d, read by ``FrechetInceptionDistance`` (no dummy forward pass needed).
    """

    def __init__(self, extractor: DualFeatureExtractor, output: str):
        super().__init__()
        self.extractor = extractor
        self.output = output
        self.num_features = extractor.output_dims[output]

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor.outputs(x)[self.output]
