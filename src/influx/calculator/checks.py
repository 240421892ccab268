"""What both calculators check: the model, the chunking of dask arrays, thread safety.

The exceptions here are raised before anything is computed, with messages that name the
parameter, what was expected and what was given.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ..base_influence_function_model import InfluenceFunctionModel
from ..ordering import check_ordered

__all__ = [
    "DisableClientSingleThreadCheck",
    "InvalidDimensionChunksError",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
    "check_model",
    "check_ordered_iterable",
    "numpy_dtype",
    "self_influence_function",
]


class InvalidDimensionChunksError(ValueError):
    """A dask array is chunked along an axis other than the first."""

    def __init__(self, chunks: Tuple[Tuple[int, ...], ...], name: str = "x"):
        super().__init__(
            f"Parameter '{name}' must be chunked along its first axis only, got chunks "
            f"{_chunks_summary(chunks)}; rechunk it, e.g. {name}.rechunk({{i: -1 for i in "
            f"range(1, {name}.ndim)}})."
        )


class UnalignedChunksError(ValueError):
    """Inputs and targets of a dask computation are chunked differently along the first axis."""

    def __init__(
        self,
        chunk_sizes_x: Tuple[int, ...],
        chunk_sizes_y: Tuple[int, ...],
        names: Tuple[str, str] = ("x", "y"),
    ):
        super().__init__(
            f"Parameters '{names[0]}' and '{names[1]}' must have the same chunks along the "
            f"first axis, got {_sizes_summary(chunk_sizes_x)} and "
            f"{_sizes_summary(chunk_sizes_y)}."
        )


class ThreadSafetyViolationError(ValueError):
    """A model that is not thread-safe would run on Dask workers with several threads."""

    def __init__(self, thread_counts: Optional[Dict[str, int]] = None):
        counts = "" if thread_counts is None else f" (threads per worker: {thread_counts})"
        super().__init__(
            "The influence model is not thread-safe, but the Dask client has workers with more "
            f"than one thread{counts}: start the cluster with threads_per_worker=1, or pass "
            "DisableClientSingleThreadCheck instead of the client to skip this check."
        )


class DisableClientSingleThreadCheck:
    """Pass this class instead of a `distributed.Client` to the
    [DaskInfluenceCalculator][influx.calculator.DaskInfluenceCalculator] to skip the check
    that a non-thread-safe model runs on single-threaded workers, e.g. to debug with the
    synchronous scheduler (`dask.config.set(scheduler="synchronous")`). The model is then
    embedded once in each graph instead of being installed on the workers by a plugin.
    """

    @staticmethod
    def warning_msg() -> str:
        return (
            "The thread-safety check of the Dask client is disabled: make sure that a model "
            "that is not thread-safe runs on single-threaded workers or the synchronous "
            "scheduler."
        )


def _sizes_summary(sizes: Tuple[int, ...]) -> str:
    sizes = tuple(sizes)
    if len(sizes) <= 6:
        return str(sizes)
    return f"({', '.join(map(str, sizes[:3]))}, ..., {sizes[-1]}) [{len(sizes)} chunks]"


def _chunks_summary(chunks: Tuple[Tuple[int, ...], ...]) -> str:
    return "(" + ", ".join(_sizes_summary(c) for c in chunks) + ")"


def check_model(model: Any) -> None:
    if not isinstance(model, InfluenceFunctionModel):
        raise TypeError(
            "Parameter 'influence_function_model' must be an InfluenceFunctionModel, got "
            f"{type(model).__name__}."
        )
    if not model.is_fitted:
        raise ValueError(
            f"Parameter 'influence_function_model': {type(model).__name__} is not fitted; "
            "call 'fit' with the training data first."
        )


def self_influence_function(model: Any) -> Callable[..., Any]:
    compute = getattr(model, "self_influences", None)
    if compute is None:
        raise TypeError(
            f"{type(model).__name__} does not compute self-influences: it needs a "
            "'self_influences(x, y, mode)' method, as every influx influence model has."
        )
    return compute  # type: ignore[no-any-return]


def numpy_dtype(model: Any, fallback: np.dtype) -> np.dtype:
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        return fallback
    try:
        return np.dtype(str(dtype).split(".")[-1])
    except TypeError:
        return fallback


def check_ordered_iterable(iterable: Any, name: str) -> None:
    """Raise an [UnorderedDataError][influx.errors.UnorderedDataError] if `iterable` is a
    data loader that does not yield all its samples in a fixed order (e.g. `shuffle=True` or
    `drop_last=True`, see [influx.ordering.check_ordered][]): the rows (or columns) written
    by a calculator follow its batches."""
    check_ordered(iterable, name, "the rows written")
