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
from .validation import check_batch_for_model, check_labels_for_loss

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
    for leaf in leaves(batch.x):
        check_batch_for_model(leaf, parameter.dtype, parameter.device, "x")
    if loss is not None and isinstance(batch.y, torch.Tensor) and not is_task(loss):
        check_labels_for_loss(batch.y, cast(Callable[..., Any], loss), "y")
    return batch


def model_data(data: Iterable, cast_to: Optional[torch.dtype] = None) -> Iterable:
    """The training data with floating tensors in `cast_to`; `data` itself if None."""
    return data if cast_to is None else CastData(data, cast_to)


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


class CastData:
    """A data loader whose floating inputs and targets are converted to `dtype`; its order
    (`sampler`, `batch_sampler`) and length are those of the wrapped loader."""

    def __init__(self, data: Iterable, dtype: torch.dtype):
        self.data = data
        self.dtype = dtype
        self.sampler = getattr(data, "sampler", None)
        self.batch_sampler = getattr(data, "batch_sampler", None)

    def __iter__(self) -> Any:
        for batch in loader_items(self.data):
            if isinstance(batch, (tuple, list, Mapping)):
                batch = map_structure(self._convert, normalise_structure(batch))
            yield batch

    def _convert(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.dtype)
        return value

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]
