"""Input checks of the evaluation functions: arrays from any library as float64 numpy arrays.

Arrays are accepted by duck typing: anything `numpy.asarray` converts (numpy arrays, lists,
CPU torch tensors; a tensor that requires grad or lives on another device is detached and
copied to the CPU first). Every failure is a `ValueError` that names the parameter, what was
expected and what was given.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "as_array",
    "as_bool_matrix",
    "as_finite_float",
    "check_positive_int",
    "check_seeds",
]


def as_array(value: Any, name: str) -> NDArray:
    """`value` as a numpy array, detaching and moving tensors to the CPU (duck typing)."""
    if hasattr(value, "detach") and callable(value.detach):
        value = value.detach()
    if hasattr(value, "cpu") and callable(value.cpu):
        value = value.cpu()
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"Parameter '{name}' must be an array (numpy array, tensor or nested list), got "
            f"a {type(value).__name__} that numpy cannot convert ({error})."
        ) from None


def as_finite_float(
    value: Any, name: str, ndim: int, shape: Optional[Sequence[Optional[int]]] = None
) -> NDArray[np.float64]:
    """`value` as a finite float64 array with `ndim` dimensions and the given `shape` (None
    entries are free).

    Raises:
        ValueError: for another number of dimensions or shape, a non-real dtype, NaN or Inf.
    """
    array = as_array(value, name)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(
            f"Parameter '{name}' must hold real numbers (a float or integer dtype), got dtype "
            f"{array.dtype}."
        )
    _check_shape(array, name, ndim, shape)
    result = array.astype(np.float64, copy=False)
    bad = ~np.isfinite(result)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"Parameter '{name}' must be finite, got {int(bad.sum())} NaN or Inf value(s), "
            f"the first at index {first}."
        )
    return result


def as_bool_matrix(value: Any, name: str, shape: Sequence[Optional[int]]) -> NDArray[np.bool_]:
    """`value` as a 2-d boolean array of the given `shape` (None entries are free).

    Raises:
        ValueError: for another dtype than bool, or another number of dimensions or shape.
    """
    array = as_array(value, name)
    if array.dtype != np.bool_:
        raise ValueError(
            f"Parameter '{name}' must be a boolean mask (dtype bool), got dtype {array.dtype}."
        )
    _check_shape(array, name, 2, shape)
    return array


def _check_shape(
    array: NDArray, name: str, ndim: int, shape: Optional[Sequence[Optional[int]]]
) -> None:
    if array.ndim != ndim:
        raise ValueError(
            f"Parameter '{name}' must have {ndim} dimension(s), got shape {array.shape}."
        )
    if shape is None:
        return
    expected = tuple("*" if s is None else s for s in shape)
    if any(s is not None and s != a for s, a in zip(shape, array.shape)):
        raise ValueError(
            f"Parameter '{name}' must have shape {_shape_text(expected)}, got {array.shape}."
        )


def _shape_text(shape: Tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`, else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"Parameter '{name}' must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_seeds(seeds: Any) -> Tuple[int, ...]:
    """`seeds` as a non-empty tuple of distinct ints, else a ValueError naming `seeds`."""
    try:
        items = tuple(seeds)
    except TypeError:
        raise ValueError(
            f"Parameter 'seeds' must be a sequence of integers, e.g. (0, 1, 2), got {seeds!r}."
        ) from None
    if (
        not items
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in items)
        or len(set(int(s) for s in items)) != len(items)
    ):
        raise ValueError(
            f"Parameter 'seeds' must be a non-empty sequence of distinct integers, got {seeds!r}."
        )
    return tuple(int(s) for s in items)
