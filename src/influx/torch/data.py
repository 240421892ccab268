"""Batches of training and test data, and iteration over data loaders.

A batch is a pair `(x, y)` of inputs and targets sharing their first (sample) dimension; a
data loader is any iterable of such pairs, typically a `torch.utils.data.DataLoader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..types import Batch

__all__ = ["TorchBatch", "iterate_batches", "endless_batches"]


@dataclass(frozen=True)
class TorchBatch(Batch):
    """Inputs `x` and targets `y` of one batch; their first dimensions must agree."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("x", "y"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"Parameter '{name}' must be a torch.Tensor, got {type(value).__name__}."
                )
            if value.ndim == 0:
                raise ValueError(
                    f"Parameter '{name}' must have a batch dimension, got a scalar tensor."
                )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                "Parameters 'x' and 'y' must have the same number of samples (first "
                f"dimension), got x with shape {tuple(self.x.shape)} and y with shape "
                f"{tuple(self.y.shape)}."
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device) -> "TorchBatch":
        """A batch on `device` (self is unchanged)."""
        return TorchBatch(self.x.to(device), self.y.to(device))


def iterate_batches(
    data: Iterable, device: torch.device, name: str = "data"
) -> Iterator[TorchBatch]:
    """Yield the `(x, y)` batches of a data loader as [TorchBatch][influx.torch.data.TorchBatch]
    on `device`; `name` is the parameter named in the error for anything but pairs."""
    for index, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"Parameter '{name}' must yield pairs (x, y) of tensors; batch "
                f"{index} is a {type(batch).__name__}"
                + (f" of length {len(batch)}." if isinstance(batch, (tuple, list)) else ".")
            )
        yield TorchBatch(batch[0], batch[1]).to(device)


def endless_batches(data: Iterable, device: torch.device) -> Iterator[TorchBatch]:
    """Iterate over `data` again and again (a fresh iterator per pass, so a shuffling sampler
    reshuffles).

    Raises:
        ValueError: if a pass yields no batch.
    """
    while True:
        empty = True
        for batch in iterate_batches(data, device):
            empty = False
            yield batch
        if empty:
            raise ValueError("Parameter 'data' yielded no batches.")
