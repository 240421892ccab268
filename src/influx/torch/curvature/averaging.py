r"""Averaging a stream of tensors (e.g. per-batch results), as pyDVL's batch operations do.

[PointAveraging][influx.torch.curvature.averaging.PointAveraging] weights every tensor by its number of
points, so the average over a data loader does not depend on the batch size;
[ChunkAveraging][influx.torch.curvature.averaging.ChunkAveraging] takes the plain mean.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Dict, Iterable, Optional, TypeVar

import torch

__all__ = ["ChunkAveraging", "PointAveraging", "TensorAveragingType"]


class _Averaging(ABC):
    """Averages a stream of tensors (e.g. per-batch results) into one tensor."""

    @abstractmethod
    def _weight(self, tensor: torch.Tensor) -> float:
        """The weight of one tensor of the stream."""

    def __call__(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        weight = 0.0
        for tensor in tensors:
            w = self._weight(tensor)
            total = tensor * w if total is None else total + tensor * w
            weight += w
        if total is None:
            raise ValueError("Parameter 'tensors' yielded nothing to average.")
        return total / weight

    def as_dict_averaging(
        self,
    ) -> Callable[[Iterable[Dict[str, torch.Tensor]]], Dict[str, torch.Tensor]]:
        """The same averaging for a stream of dicts of tensors (weighted by their first
        entry), applied key by key."""

        def average(tensor_dicts: Iterable[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
            total: Optional[Dict[str, torch.Tensor]] = None
            weight = 0.0
            for tensor_dict in tensor_dicts:
                w = self._weight(next(iter(tensor_dict.values())))
                if total is None:
                    total = {k: t * w for k, t in tensor_dict.items()}
                else:
                    total = {k: total[k] + t * w for k, t in tensor_dict.items()}
                weight += w
            if total is None:
                raise ValueError("Parameter 'tensor_dicts' yielded nothing to average.")
            return {k: t / weight for k, t in total.items()}

        return average


class ChunkAveraging(_Averaging):
    r"""The plain mean of a stream of tensors, $\frac{1}{m}\sum_{k=1}^m t_k$."""

    def _weight(self, tensor: torch.Tensor) -> float:
        return 1.0


class PointAveraging(_Averaging):
    r"""The mean of a stream of tensors weighted by their number of points,
    $\sum_k n_k t_k / \sum_k n_k$ with $n_k$ the size of $t_k$ along `batch_dim`.

    Args:
        batch_dim: the dimension whose size is the number of points of a tensor.
    """

    def __init__(self, batch_dim: int = 0):
        self.batch_dim = batch_dim

    def _weight(self, tensor: torch.Tensor) -> float:
        return float(tensor.shape[self.batch_dim])


TensorAveragingType = TypeVar("TensorAveragingType", bound=_Averaging)
