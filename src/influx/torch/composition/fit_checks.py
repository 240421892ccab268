"""The checks of `fit` that need the model and the training data.

[TorchComposableInfluence.fit][influx.torch.composition.composable.TorchComposableInfluence.fit] calls them:
before fitting, [check_first_batch][influx.torch.composition.fit_checks.check_first_batch] evaluates the
model and loss once on the first batch; after fitting,
[non_finite_state][influx.torch.composition.fit_checks.non_finite_state] looks for NaN / Inf in the state
of every block, and [non_finite_error][influx.torch.composition.fit_checks.non_finite_error] traces it
back to the first batch with non-finite values. The checks on tensors themselves live in
[influx.torch.data.validation][influx.torch.data.validation].
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, cast

import torch

from ...errors import NonFiniteCurvatureError
from ..autodiff.derivatives import (
    LossFunction,
    LossOrTask,
    create_batch_loss_function,
    create_per_sample_loss_function,
)
from ..autodiff.model_call import is_task, is_vmap_limitation
from ..curvature.tensor_operator import TensorOperator
from ..data.batches import iterate_batches
from ..data.state import OperatorState
from ..data.structures import leaves
from ..data.validation import (
    check_batch_for_model,
    check_eval_mode,
    check_labels_for_loss,
    check_loss_decomposes,
    forward_error,
    is_finite,
)

__all__ = ["check_first_batch", "non_finite_error", "non_finite_state"]

_FORWARD_ERRORS = (RuntimeError, IndexError, TypeError, ValueError)


def check_first_batch(
    model: torch.nn.Module,
    loss: Optional[LossOrTask],
    params: Dict[str, torch.Tensor],
    data: Iterable,
    device: torch.device,
) -> None:
    """Check the model and the first batch of `data` before fitting.

    The model must be in eval mode if it has dropout or batch norm; the inputs must have the
    model's dtype and the labels a dtype the loss takes; the model and loss must run on the
    batch (a torch error is re-raised with the shapes and dtypes involved); the loss must be
    a scalar, and the loss of the batch the mean of its per-sample losses.

    Args:
        model: the model the influences are computed for.
        loss: the loss; None skips the checks that need it.
        params: the parameters of all blocks, detached.
        data: the training data.
        device: the model's device.
    """
    check_eval_mode(model)
    batch = next(iter(iterate_batches(data, device, "data")), None)
    if batch is None or loss is None:
        return
    inputs = leaves(batch.x)
    dtype = next(iter(params.values())).dtype if params else inputs[0].dtype
    for tensor in inputs:
        check_batch_for_model(tensor, dtype, device, "data")
    if isinstance(batch.y, torch.Tensor) and not is_task(loss):
        check_labels_for_loss(batch.y, cast(LossFunction, loss), "data")
    bad = [name for name, value in params.items() if not is_finite(value)]
    if bad:
        raise NonFiniteCurvatureError(
            f"Parameter 'model' has NaN or Inf in its parameters {bad[:5]}: every influence "
            "would be NaN or meaningless. Check the training run that produced the model."
        )
    with torch.no_grad():
        try:
            value = create_batch_loss_function(model, loss, params)(params, batch.x, batch.y)
        except _FORWARD_ERRORS as error:
            raise forward_error(error, batch.x, batch.y, model, "data") from error
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise ValueError(
                "Parameter 'loss' must return a scalar (mean reduction over the batch), got "
                f"{shape} on the first batch."
            )
        if len(batch) < 2:
            return
        try:
            per_sample = create_per_sample_loss_function(model, loss, params)(
                params, batch.x, batch.y
            )
        except _FORWARD_ERRORS as error:
            if is_vmap_limitation(error):
                return  # a model vmap cannot map: per-sample values are computed otherwise
            raise forward_error(error, batch.x, batch.y, model, "data") from error
    check_loss_decomposes(value, per_sample)


def non_finite_state(op: TensorOperator) -> List[str]:
    """The names of the tensors of the operator's exported state (and its children's) with
    NaN or Inf; empty for an operator that exports no state."""
    try:
        state = op.export_state()
    except (NotImplementedError, ValueError):
        return []
    return _non_finite_tensors(state)


def _non_finite_tensors(state: OperatorState, prefix: str = "") -> List[str]:
    bad = [f"{prefix}{name}" for name, tensor in state.tensors.items() if not is_finite(tensor)]
    for name, child in state.children.items():
        bad.extend(_non_finite_tensors(child, f"{prefix}{name}/"))
    return bad


def non_finite_error(
    model: torch.nn.Module,
    loss: Optional[LossOrTask],
    params: Dict[str, torch.Tensor],
    data: Iterable,
    block: Optional[str],
    cause: str,
) -> NonFiniteCurvatureError:
    """The error for a non-finite fitted state: it names the block and the first batch of
    `data` with NaN / Inf in its inputs, targets or loss (found in one pass over the data).
    """
    where = (
        "no batch has non-finite inputs, targets or loss, so the curvature overflowed: check "
        "the scale of the inputs and of the model's parameters, or use "
        "compute_dtype=torch.float64"
    )
    device = next(iter(params.values())).device if params else torch.device("cpu")
    loss_function = None if loss is None else create_batch_loss_function(model, loss, params)
    with torch.no_grad():
        for index, batch in enumerate(iterate_batches(data, device, "data")):
            bad = [
                what
                for what, value in (("inputs", batch.x), ("targets", batch.y))
                if not all(is_finite(tensor) for tensor in leaves(value))
            ]
            if bad:
                where = (
                    f"batch {index} of 'data' is the first with NaN or Inf in its "
                    f"{' and '.join(bad)}: remove or impute those samples"
                )
                break
            if loss_function is not None and not is_finite(loss_function(params, batch.x, batch.y)):
                where = (
                    f"the loss of batch {index} of 'data' is the first that is NaN or Inf: check "
                    "its samples and the loss"
                )
                break
    name = "a block" if block is None else f"block {block!r}"
    return NonFiniteCurvatureError(
        f"The fitted curvature of {name} is not finite ({cause}); {where}. Influences computed "
        "from it would be meaningless."
    )
