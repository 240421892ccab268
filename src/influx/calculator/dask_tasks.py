"""The tasks the Dask calculator maps over the chunks of its arrays.

Each task resolves the model handle on its worker (see
[influx.calculator.model_handles][influx.calculator.model_handles]), converts the numpy chunks
(or structures of chunks) with the calculator's converter, and returns a numpy chunk of the
requested dtype.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..array import NumpyConverter
from ..base_influence_function_model import InfluenceFunctionModel
from ..types import InfluenceMode
from .checks import self_influence_function
from .model_handles import ModelHandle
from .structured import map_leaves

__all__ = ["factors_task", "influences_task", "self_influences_task", "serialize_model"]


def self_influences_task(
    x: np.ndarray,
    y: np.ndarray,
    handle: ModelHandle,
    converter: NumpyConverter,
    mode: InfluenceMode,
    dtype: np.dtype,
) -> np.ndarray:
    """The self-influences of a chunk of training points."""
    model = handle.resolve()
    result = self_influence_function(model)(
        map_leaves(converter.from_numpy, x), map_leaves(converter.from_numpy, y), mode
    )
    return np.asarray(converter.to_numpy(result), dtype=dtype)


def factors_task(
    x: np.ndarray,
    y: np.ndarray,
    handle: ModelHandle,
    converter: NumpyConverter,
    dtype: np.dtype,
    options: Optional[Dict[str, Any]] = None,
) -> np.ndarray:
    """The influence factors of a chunk of test points (`options`: the per-token arguments
    of the model's `influence_factors`)."""
    model = handle.resolve()
    result = model.influence_factors(
        map_leaves(converter.from_numpy, x), map_leaves(converter.from_numpy, y), **(options or {})
    )
    return np.asarray(converter.to_numpy(result), dtype=dtype)


def influences_task(
    factors: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    handle: ModelHandle,
    converter: NumpyConverter,
    mode: InfluenceMode,
    dtype: np.dtype,
    options: Optional[Dict[str, Any]] = None,
    shape: Optional[Tuple[int, ...]] = None,
) -> np.ndarray:
    """The influences of a chunk of training points from a chunk of test factors; with
    `shape`, a chunk of another shape (per-token influences of sequences longer than the
    declared token axis) is a ValueError naming `max_length`."""
    model = handle.resolve()
    result = model.influences_from_factors(
        converter.from_numpy(factors),
        map_leaves(converter.from_numpy, x),
        map_leaves(converter.from_numpy, y),
        mode,
        **(options or {}),
    )
    values = np.asarray(converter.to_numpy(result), dtype=dtype)
    if shape is not None and tuple(values.shape) != tuple(shape):
        raise ValueError(
            f"Parameter 'max_length': a chunk of per-token influences has shape {values.shape}, "
            f"the result declares {tuple(shape)}; pass max_length to pad every chunk to the "
            "longest sequence."
        )
    return values


def serialize_model(model: InfluenceFunctionModel) -> bytes:
    """The model pickled with cloudpickle, or a TypeError naming the parameter."""
    import cloudpickle

    try:
        return cloudpickle.dumps(model)  # type: ignore[no-any-return]
    except Exception as error:
        raise TypeError(
            "Parameter 'influence_function_model' must be serialisable with cloudpickle to be "
            f"sent to the Dask workers; serialising {type(model).__name__} failed with "
            f"{type(error).__name__}: {error}"
        ) from error
