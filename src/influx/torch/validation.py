"""Input validation shared by the torch layer.

Every check raises an exception that names the parameter, what was expected and what was
given: `TypeError` for a wrong type, `ValueError` for a wrong value or shape. Nothing here
knows about operators or models.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Union

import torch

__all__ = [
    "RegularizationType",
    "check_dampen",
    "check_finite",
    "check_maxiter",
    "check_non_negative",
    "check_positive",
    "check_positive_int",
    "check_rows",
    "is_finite",
    "regularization_by_block",
    "require_positive_regularization",
    "validate_cg_settings",
    "validate_lissa_settings",
    "validate_regularization",
]

RegularizationType = Optional[Union[float, Mapping[str, Optional[float]]]]
"""A regularization $\\lambda$: one value for every block, or a dict keyed by block name."""


def validate_regularization(value: Optional[float], name: str = "regularization") -> None:
    """Raise unless `value` is None or a finite non-negative number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Parameter '{name}' must be a float or None, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Parameter '{name}' must be a non-negative number, got {value}.")


def regularization_by_block(
    regularization: RegularizationType, block_names: List[str]
) -> Dict[str, Optional[float]]:
    """Expand a float or a dict keyed by block name into one value per block.

    Blocks missing from a dict get no regularization (None).

    Raises:
        ValueError: for negative values or keys that are not block names (the message lists
            the valid names).
    """
    if isinstance(regularization, Mapping):
        unknown = [k for k in regularization if k not in block_names]
        if unknown:
            raise ValueError(
                f"Parameter 'regularization' names unknown blocks {unknown}; valid block names "
                f"are {block_names}."
            )
        for k, v in regularization.items():
            validate_regularization(v, f"regularization[{k!r}]")
        return {name: regularization.get(name) for name in block_names}
    validate_regularization(regularization)
    return {name: regularization for name in block_names}


def require_positive_regularization(
    regularization: RegularizationType, block_names: List[str], reason: str
) -> None:
    """Raise a ValueError naming 'regularization' unless every block gets $\\lambda > 0$."""
    by_block = regularization_by_block(regularization, block_names)
    bad = {name: value for name, value in by_block.items() if value is None or value <= 0}
    if bad:
        if isinstance(regularization, Mapping):
            given = ", ".join(f"{name!r}: {value}" for name, value in bad.items())
            given = f"{{{given}}}"
        else:
            given = repr(regularization)
        raise ValueError(
            f"Parameter 'regularization' must be positive for every block ({reason}), got {given}."
        )


def check_positive(value: float, name: str) -> None:
    """Raise unless `value` is a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Parameter '{name}' must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Parameter '{name}' must be a positive number, got {value}.")


def check_non_negative(value: float, name: str) -> None:
    """Raise unless `value` is a finite non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Parameter '{name}' must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Parameter '{name}' must be a non-negative number, got {value}.")


def check_positive_int(value: int, name: str) -> None:
    """Raise unless `value` is a positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Parameter '{name}' must be a positive int, got {type(value).__name__}.")
    if value <= 0:
        raise ValueError(f"Parameter '{name}' must be a positive int, got {value}.")


def check_maxiter(maxiter: Optional[int], allow_none: bool = True) -> None:
    """Raise unless `maxiter` is a positive int (or None when `allow_none`)."""
    if maxiter is None and allow_none:
        return
    if isinstance(maxiter, bool) or not isinstance(maxiter, int):
        raise TypeError(
            f"Parameter 'maxiter' must be a positive int{' or None' if allow_none else ''}, "
            f"got {type(maxiter).__name__}."
        )
    if maxiter <= 0:
        raise ValueError(f"Parameter 'maxiter' must be a positive int, got {maxiter}.")


def check_dampen(dampen: float) -> None:
    """Raise unless `dampen` is a number in $[0, 1)$."""
    if isinstance(dampen, bool) or not isinstance(dampen, (int, float)):
        raise TypeError(f"Parameter 'dampen' must be a float, got {type(dampen).__name__}.")
    if not 0 <= dampen < 1:
        raise ValueError(f"Parameter 'dampen' must be in [0, 1), got {dampen}.")


def validate_cg_settings(rtol: float, atol: float, maxiter: Optional[int]) -> None:
    """The settings of conjugate gradient: `rtol > 0`, `atol >= 0`, `maxiter` positive or None."""
    check_positive(rtol, "rtol")
    check_non_negative(atol, "atol")
    check_maxiter(maxiter)


def validate_lissa_settings(
    maxiter: int, dampen: float, scale: Union[float, str], rtol: float
) -> None:
    """The settings of LiSSA: `maxiter` positive, `dampen` in [0, 1), `scale` positive or
    `"auto"`, `rtol > 0`."""
    check_maxiter(maxiter, allow_none=False)
    check_dampen(dampen)
    check_positive(rtol, "rtol")
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(
                f"Parameter 'scale' must be a positive number or 'auto', got {scale!r}."
            )
    else:
        check_positive(scale, "scale")


def check_rows(tensor: torch.Tensor, name: str) -> None:
    """Raise unless `tensor` is a 2-D tensor (one vector per row)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Parameter '{name}' must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.ndim != 2:
        raise ValueError(
            f"Parameter '{name}' must have shape (N, P) (one vector per row), got "
            f"{tuple(tensor.shape)}."
        )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of `tensor` is finite, without a copy of its size.

    The minimum and the maximum propagate NaN, and are infinite if any entry is.
    """
    if tensor.numel() == 0:
        return True
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(
    values: Union[torch.Tensor, Mapping], what: str, block: Optional[str] = None
) -> None:
    """Raise a ValueError naming `what` (and the block, and the offending entries of a dict)
    if `values` contains NaN or Inf."""
    if isinstance(values, torch.Tensor):
        bad = [] if is_finite(values) else [what]
    else:
        bad = [name for name, value in values.items() if not is_finite(value)]
    if bad:
        where = f" in block {block!r}" if block is not None else ""
        entries = "" if isinstance(values, torch.Tensor) else f" for parameters {bad}"
        raise ValueError(
            f"NaN or Inf in the {what}{where}{entries}: check the inputs, the loss and the "
            "model's parameters."
        )
