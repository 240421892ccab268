"""How an influence model takes what it is given: batches on the model's device and in its
compute dtype, checked against the model and the loss, and training data cast to the compute
dtype.

A model computing in another dtype than its parameters' (a float16 model computes on a float32
copy) converts floating inputs and targets to that dtype once, here; integer tensors (labels,
token ids) are only moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional, Tuple, cast

import torch

from ..autodiff.model_call import LossOrTask, is_task, perturbation_entry
from .batches import TorchBatch, loader_items
from .structures import leaves, map_structure, normalise_structure
from .validation import check_batch_for_model, class_labels

__all__ = ["CastData", "model_batch", "model_data", "perturbation_shape"]


def model_batch(
    x: Any,
    y: Any,
    model: torch.nn.Module,
    loss: Optional[LossOrTask],
    cast_to: Optional[torch.dtype] = None,
) -> TorchBatch:
    """The batch `(x, y)` on the device of `model`, floating tensors in `cast_to` (None:
    unchanged), with inputs checked against the model's dtype and device and labels against
    the loss.

    Raises:
        TypeError, ValueError: naming `x` or `y`, for inputs the model or the loss cannot take.
    """
    parameter = next(model.parameters())
    batch = TorchBatch(x, y).to(parameter.device, cast_to)
    if len(batch) == 0:
        raise ValueError(
            "Parameters 'x' and 'y' hold no points (first dimension 0): influences need at "
            "least one training point and one test point."
        )
    for leaf in leaves(batch.x):
        check_batch_for_model(leaf, parameter.dtype, parameter.device, "x")
    if loss is not None and isinstance(batch.y, torch.Tensor) and not is_task(loss):
        labels = class_labels(batch.y, cast(Callable[..., Any], loss), "y")
        if labels is not batch.y:
            batch = TorchBatch(batch.x, labels, batch.test)
    return batch


def model_data(
    data: Iterable, cast_to: Optional[torch.dtype] = None, long_labels: bool = False
) -> Iterable:
    """The training data with floating tensors in `cast_to` and, with `long_labels`, integer
    targets of another dtype (int32, uint8, ...) as int64 class indices; `data` itself if
    there is nothing to convert."""
    if cast_to is None and not long_labels:
        return data
    return CastData(data, cast_to, long_labels)


def perturbation_shape(x: Any, loss: Optional[LossOrTask]) -> Tuple[int, ...]:
    """The shape of one sample of the input that `InfluenceMode.Perturbation` differentiates:
    `x.shape[1:]` for a tensor, or the shape of the entry of a structured `x` chosen by the
    task (see [perturbation_entry][influx.torch.autodiff.model_call.perturbation_entry]).

    Raises:
        ValueError: without a loss.
    """
    if loss is None:
        raise ValueError("Parameter 'loss' is required to choose the perturbed input.")
    structure = normalise_structure(x)
    index, _ = perturbation_entry(structure, loss)
    return tuple(leaves(structure)[index].shape[1:])


def _integer(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )


class CastData:
    """A data loader whose floating inputs and targets are converted to `dtype` (None:
    unchanged) and, with `long_labels`, integer targets to int64; its order
    (`sampler`, `batch_sampler`) and length are those of the wrapped loader."""

    def __init__(self, data: Iterable, dtype: Optional[torch.dtype], long_labels: bool = False):
        self.data = data
        self.dtype = dtype
        self.long_labels = long_labels
        self.sampler = getattr(data, "sampler", None)
        self.batch_sampler = getattr(data, "batch_sampler", None)

    def __iter__(self) -> Any:
        for batch in loader_items(self.data):
            if isinstance(batch, (tuple, list, Mapping)):
                batch = map_structure(self._convert, normalise_structure(batch))
            if self.long_labels and isinstance(batch, tuple) and len(batch) == 2:
                x, y = batch
                if _integer(y) and y.dtype != torch.int64:
                    batch = (x, y.long())
            yield batch

    def _convert(self, value: Any) -> Any:
        if self.dtype is not None and isinstance(value, torch.Tensor):
            if value.is_floating_point():
                return value.to(self.dtype)
        return value

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]
