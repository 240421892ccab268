"""Input validation shared by the torch layer.

Every check raises an exception that names the parameter, what was expected and what was
given: `TypeError` for a wrong type, `ValueError` for a wrong value or shape. Nothing here
knows about operators or models.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

from ...ordering import check_ordered as check_data_order

__all__ = [
    "RegularizationType",
    "check_batch_for_model",
    "check_dampen",
    "check_eval_mode",
    "check_labels_for_loss",
    "class_labels",
    "check_loss_decomposes",
    "check_nonconvergence_policy",
    "check_ordered",
    "check_seed",
    "check_finite",
    "check_maxiter",
    "check_non_negative",
    "check_positive",
    "check_positive_int",
    "check_rows",
    "default_tolerance",
    "forward_error",
    "is_finite",
    "make_generator",
    "resolve_compute_dtype",
    "regularization_by_block",
    "require_positive_regularization",
    "validate_cg_settings",
    "validate_lissa_settings",
    "validate_regularization",
    "takes_class_indices",
]

logger = logging.getLogger(__name__)

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


def validate_cg_settings(
    rtol: Optional[float], atol: Optional[float], maxiter: Optional[int]
) -> None:
    """The settings of conjugate gradient: `rtol > 0`, `atol >= 0` (None for both: what the
    dtype can reach, see [default_tolerance][influx.torch.data.validation.default_tolerance]),
    `maxiter` positive or None."""
    if rtol is not None:
        check_positive(rtol, "rtol")
    if atol is not None:
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


NONCONVERGENCE_POLICIES = ("warn", "raise")
"""The values of `on_nonconvergence`: log a warning, or raise a
[NonConvergenceError][influx.errors.NonConvergenceError]."""


def check_nonconvergence_policy(value: str) -> str:
    """Raise unless `value` is `"warn"` or `"raise"`; return it."""
    if value not in NONCONVERGENCE_POLICIES:
        raise ValueError(
            f"Parameter 'on_nonconvergence' must be one of {list(NONCONVERGENCE_POLICIES)}, "
            f"got {value!r}."
        )
    return value


def check_seed(seed: Optional[int]) -> None:
    """Raise unless `seed` is None or an int (not a bool)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"Parameter 'seed' must be an int or None, got {type(seed).__name__}.")


def make_generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    """A generator on `device` seeded with `seed`, or None (fresh random state) for None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def default_tolerance(requested: Optional[float], dtype: torch.dtype, floor: float) -> float:
    r"""`requested`, or for None: `floor` or, if larger, $10\,\epsilon$ of `dtype` (a tolerance
    below the rounding error of the dtype cannot be reached)."""
    if requested is not None:
        return requested
    return max(floor, 10 * torch.finfo(dtype).eps)


LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def resolve_compute_dtype(
    compute_dtype: Optional[torch.dtype], model_dtype: torch.dtype
) -> torch.dtype:
    """The dtype of curvature, factorisations and solves: `compute_dtype`, or by default
    float32 for a half / bfloat16 model and the model's dtype otherwise."""
    if compute_dtype is None:
        return torch.float32 if model_dtype in LOW_PRECISION_DTYPES else model_dtype
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise TypeError(
            "Parameter 'compute_dtype' must be a floating torch.dtype or None, got "
            f"{compute_dtype!r}."
        )
    if compute_dtype in LOW_PRECISION_DTYPES:
        raise ValueError(
            "Parameter 'compute_dtype' must be float32 or float64 (factorisations and solves "
            f"are not reliable in half precision), got {compute_dtype}."
        )
    return compute_dtype


def check_ordered(data: Any, name: str) -> None:
    """Raise an [UnorderedDataError][influx.errors.UnorderedDataError] unless `data` yields
    all its samples in a fixed order ([influx.ordering.check_ordered][]): training indices
    returned by a call follow the order of its batches."""
    check_data_order(data, name, "the training indices returned")


_STOCHASTIC_OR_COUPLED = (
    torch.nn.modules.dropout._DropoutNd,  # every dropout, also alpha dropout
    torch.nn.modules.batchnorm._BatchNorm,  # batch statistics in training mode
)


def check_eval_mode(model: torch.nn.Module) -> None:
    """Raise a ValueError if `model` is in training mode with dropout or batch norm; log a
    warning if it is in training mode with modules that are not torch's own (they may read
    `self.training`).

    Dropout makes every gradient random (and fails inside `vmap`), batch norm in training
    mode couples the samples of a batch: per-sample gradients are then meaningless.
    """
    if not model.training:
        return
    offending = [
        f"{name or type(model).__name__} ({type(module).__name__})"
        for name, module in model.named_modules()
        if module.training and isinstance(module, _STOCHASTIC_OR_COUPLED)
    ]
    if offending:
        raise ValueError(
            "Parameter 'model' is in training mode with layers that are random or couple the "
            f"samples of a batch: {', '.join(offending[:5])}"
            + (" ..." if len(offending) > 5 else "")
            + ". Their gradients would be random or depend on the other samples of the "
            "batch. Call model.eval() before creating the influence model."
        )
    custom = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if module.training and not type(module).__module__.startswith("torch.nn")
    ]
    if custom:
        logger.warning(
            "The model is in training mode; it has no dropout or batch norm, but its modules "
            "%s are not torch's own and may behave differently in training mode. Call "
            "model.eval() to be sure.",
            custom[:5],
        )
    else:
        logger.debug("The model is in training mode; its layers behave the same in eval mode.")


def check_batch_for_model(
    x: torch.Tensor, model_dtype: torch.dtype, model_device: torch.device, name: str = "x"
) -> None:
    """Raise a TypeError if floating inputs `x` have another dtype than the model, a
    ValueError if they are on another device."""
    if x.is_floating_point() and x.dtype != model_dtype:
        raise TypeError(
            f"Parameter '{name}' must have the model's dtype {model_dtype}, got {x.dtype}: "
            f"convert the data (x.to({model_dtype})) or the model."
        )
    if x.device != model_device:
        raise ValueError(
            f"Parameter '{name}' must be on the model's device {model_device}, got {x.device}."
        )


def _loss_kind(loss: Callable[..., Any]) -> Optional[str]:
    """`"cross_entropy"` / `"nll_loss"` if `loss` is (a partial or module of) one of them."""
    while isinstance(loss, functools.partial):
        loss = loss.func
    functional = torch.nn.functional
    if loss is functional.cross_entropy or isinstance(loss, torch.nn.CrossEntropyLoss):
        return "cross_entropy"
    if loss is functional.nll_loss or isinstance(loss, torch.nn.NLLLoss):
        return "nll_loss"
    return None


def check_labels_for_loss(y: torch.Tensor, loss: Callable[..., Any], name: str = "y") -> None:
    """Raise a TypeError for floating class labels given to a classification loss.

    Cross-entropy and the negative log-likelihood take class indices (int64, shape `(N,)`);
    cross-entropy also takes class probabilities (float, shape `(N, C)`).
    """
    kind = _loss_kind(loss)
    if kind is None or not y.is_floating_point():
        return
    if kind == "cross_entropy" and y.ndim >= 2:
        return  # class probabilities
    raise TypeError(
        f"Parameter '{name}' must hold class indices of dtype torch.int64 for {kind} "
        f"(shape (N,)), got dtype {y.dtype} with shape {tuple(y.shape)}: convert the labels "
        f"with {name}.long()."
    )


def takes_class_indices(loss: Any) -> bool:
    """Whether `loss` is (a partial or module of) cross-entropy or the negative
    log-likelihood, whose integer targets are int64 class indices."""
    return callable(loss) and _loss_kind(loss) is not None


def class_labels(y: torch.Tensor, loss: Callable[..., Any], name: str = "y") -> torch.Tensor:
    """The targets as the loss takes them: checked by `check_labels_for_loss`, integer class
    indices of another dtype (int32, uint8, ...) converted to int64.

    Raises:
        TypeError: for floating class labels (see `check_labels_for_loss`).
        ValueError: for class indices of shape `(N, 1)`.
    """
    check_labels_for_loss(y, loss, name)
    kind = _loss_kind(loss)
    if kind is None or y.is_floating_point() or y.dtype == torch.bool:
        return y
    if y.ndim == 2 and y.shape[1] == 1:
        raise ValueError(
            f"Parameter '{name}' must hold class indices of shape (N,) for {kind}, got shape "
            f"{tuple(y.shape)}: use {name}.squeeze(1)."
        )
    return y if y.dtype == torch.int64 else y.long()


def _describe(value: Any) -> str:
    """`shape ... and dtype ...` of a tensor, or of every tensor of a structure."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def forward_error(
    error: Exception, x: Any, y: Any, model: torch.nn.Module, name: str
) -> ValueError:
    """A ValueError that puts a torch error raised by the first forward pass into context:
    the shapes and dtypes of the batch and what the model's first layer expects."""
    first = None
    for module_name, module in model.named_modules():
        for attribute in ("in_features", "in_channels", "num_embeddings"):
            if hasattr(module, attribute):
                first = (
                    f"its first layer {module_name or type(model).__name__!r} is "
                    f"{type(module).__name__} with {attribute}={getattr(module, attribute)}"
                )
                break
        if first is not None:
            break
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else None
    return ValueError(
        f"The model and loss could not be evaluated on the first batch of '{name}' (x with "
        f"{_describe(x)}, y with {_describe(y)}; the model's parameters have dtype {dtype}"
        + (f", {first}" if first else "")
        + f"): {error}"
    )


def check_loss_decomposes(
    batch_loss: torch.Tensor, per_sample_losses: torch.Tensor, name: str = "loss"
) -> None:
    r"""Raise a ValueError unless the loss of a batch is the mean of its per-sample losses.

    Influences use per-sample gradients: $\nabla \ell_i$ is the gradient of the loss of the
    batch $\{z_i\}$. That is meaningful only if $L(\text{batch}) = \frac1n\sum_i
    \ell_i$; a loss (or model) that couples the samples of a batch breaks it.
    """
    if per_sample_losses.numel() < 2 or not (
        is_finite(batch_loss) and is_finite(per_sample_losses)
    ):
        return  # non-finite values are reported by the checks of the fitted state
    mean = per_sample_losses.mean()
    eps = torch.finfo(per_sample_losses.dtype).eps
    scale = max(float(batch_loss.abs()), float(per_sample_losses.abs().mean()), 1e-30)
    difference = float((batch_loss - mean).abs())
    if difference <= 1000 * eps * scale:
        return
    n = per_sample_losses.numel()
    hint = ""
    if abs(float(batch_loss) - n * float(mean)) <= 1000 * eps * scale * n:
        hint = " It equals the sum of the per-sample losses: use reduction='mean'."
    raise ValueError(
        f"Parameter '{name}': the loss of the first batch ({float(batch_loss):.6g}) is not the "
        f"mean of its per-sample losses ({float(mean):.6g}), so the loss couples the samples "
        "of a batch (batch statistics such as centring on the batch mean, batch norm in "
        "training mode, a sum reduction) and per-sample gradients, hence influences, would "
        "be meaningless." + hint + " Use a loss with mean reduction whose value for a batch "
        "is the mean of the values of its samples, and call model.eval()."
    )
