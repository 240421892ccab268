"""What both calculators check: the model, the chunking of dask arrays, thread safety.

The exceptions here are raised before anything is computed, with messages that name the
parameter, what was expected and what was given.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ..base_influence_function_model import InfluenceFunctionModel
from ..ordering import check_ordered
from ..types import TOKEN_AXES, InfluenceMode
from .structured import leaves_with_paths

__all__ = [
    "DisableClientSingleThreadCheck",
    "InvalidDimensionChunksError",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
    "check_model",
    "check_ordered_iterable",
    "check_per_token",
    "chunk_shape",
    "numpy_dtype",
    "self_influence_function",
    "token_length",
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


def check_per_token(
    model: Any, per_token: Optional[str], mode: InfluenceMode, max_length: Optional[int]
) -> Optional[int]:
    """Check the per-token arguments of a calculator and return the token axis of the result
    (None without `per_token`): the model must compute the side's per-token influences (its
    `check_per_token` says so), `max_length` must be a positive int, and is only meaningful
    with `per_token`."""
    if per_token is None:
        if max_length is not None:
            raise ValueError(
                "Parameter 'max_length' pads the token axis of per-token influences: pass it "
                f"with per_token='test' or 'train', got max_length={max_length!r} without."
            )
        return None
    check = getattr(model, "check_per_token", None)
    if check is None:
        raise TypeError(
            f"Parameter 'per_token': {type(model).__name__} does not compute per-token "
            "influences (it needs a 'check_per_token' method, as every influx torch model has)."
        )
    check(per_token, mode)
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(f"Parameter 'max_length' must be a positive int, got {max_length!r}.")
    return TOKEN_AXES[per_token]


def token_length(x: Any, y: Any, max_length: Optional[int], name: str) -> int:
    """The length of the token axis of per-token influences of dask arrays `(x, y)`:
    `max_length`, or axis 1 of `y` (the labels of a causal LM, `(N, T)`) or else of the first
    array of `x` with two axes."""
    if max_length is not None:
        return int(max_length)
    for value in (y, x):
        for _, array in leaves_with_paths(value, name):
            if array.ndim >= 2:
                return int(array.shape[1])
    raise ValueError(
        f"Parameter 'max_length' is needed: no array of '{name}' has a token axis (axis 1) "
        "to take the length of the per-token influences from."
    )


def chunk_shape(
    n_rows: int, n_cols: int, trailing: Tuple[int, ...], tokens: Optional[Tuple[Any, int]]
) -> Tuple[int, ...]:
    """The shape of a chunk of influences: `(n_rows, n_cols, *trailing)`, or with the token
    axis `tokens = (axis, length)` of per-token influences."""
    if tokens is None:
        return (n_rows, n_cols) + trailing
    return (n_rows, tokens[1], n_cols) if tokens[0] == 1 else (n_rows, n_cols, tokens[1])
