"""The regularization $\\lambda$ of influence models: one value or a dict naming every block,
each a number, `"auto"` or None, normalised and checked. Raises like the other input checks
(naming the parameter, what was expected and what was given)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from .validation import RegularizationType, validate_regularization

__all__ = [
    "AUTO_REGULARIZATION",
    "as_regularization",
    "regularization_by_block",
    "require_positive_regularization",
]

AUTO_REGULARIZATION = "auto"
"""The regularization value that asks for the automatic, curvature-relative choice."""


def as_regularization(value: Any, name: str = "regularization") -> Optional[Union[float, str]]:
    """`value` as a regularization of one block: None, `"auto"` or a float.

    Python numbers, numpy scalars and 0-d tensors (or one-element arrays) are accepted as
    numbers and returned as a Python float.

    Raises:
        TypeError: for anything else (the message names `name`).
        ValueError: for a negative or non-finite number, or a string other than `"auto"`.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value != AUTO_REGULARIZATION:
            raise ValueError(
                f"Parameter '{name}' must be a non-negative number, \"auto\" or None, got "
                f"{value!r}."
            )
        return value
    if not isinstance(value, (bool, int, float)):
        size = getattr(value, "size", None)
        numel = value.numel() if isinstance(value, torch.Tensor) else size
        if numel == 1 and hasattr(value, "item"):
            value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Parameter '{name}' must be a non-negative number, \"auto\" or None, got "
            f"{type(value).__name__}."
        )
    validate_regularization(float(value), name)
    return float(value)


def regularization_by_block(
    regularization: RegularizationType, block_names: List[str]
) -> Dict[str, Optional[Union[float, str]]]:
    """Expand one value or a dict keyed by block name into one value per block.

    Values are normalised by [as_regularization][influx.torch.data.regularization.as_regularization]
    (numpy scalars and 0-d tensors become floats).

    Raises:
        ValueError: for negative values, for keys that are not block names (the message lists
            the valid names) and for a dict that does not name every block (the message lists
            the missing ones).
    """
    if isinstance(regularization, Mapping):
        unknown = [k for k in regularization if k not in block_names]
        if unknown:
            raise ValueError(
                f"Parameter 'regularization' names unknown blocks {unknown}; valid block names "
                f"are {block_names}."
            )
        missing = [name for name in block_names if name not in regularization]
        if missing:
            raise ValueError(
                f"Parameter 'regularization' must name every block, got no value for "
                f'{missing}: give each a number, "auto" or None (no regularization).'
            )
        return {
            name: as_regularization(regularization[name], f"regularization[{name!r}]")
            for name in block_names
        }
    value = as_regularization(regularization)
    return {name: value for name in block_names}


def require_positive_regularization(
    regularization: RegularizationType, block_names: List[str], reason: str
) -> None:
    """Raise a ValueError naming 'regularization' unless every block gets $\\lambda > 0$."""
    by_block = regularization_by_block(regularization, block_names)
    bad = {
        name: value
        for name, value in by_block.items()
        if value is None or (value != AUTO_REGULARIZATION and float(value) <= 0)
    }
    if bad:
        if isinstance(regularization, Mapping):
            given = ", ".join(f"{name!r}: {value}" for name, value in bad.items())
            given = f"{{{given}}}"
        else:
            given = repr(regularization)
        raise ValueError(
            f"Parameter 'regularization' must be positive for every block ({reason}), got {given}."
        )
