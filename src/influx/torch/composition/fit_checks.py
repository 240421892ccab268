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

from typing import Any, Dict, Iterable, List, Optional, Tuple, cast

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
from ..data.batches import TorchBatch, iterate_batches
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

__all__ = [
    "check_first_batch",
    "check_gradients_nonzero",
    "check_test_gradients",
    "check_unchanged",
    "loss_name",
    "non_finite_error",
    "non_finite_state",
    "tensor_versions",
]

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
    check_gradients_nonzero(model, loss, params, batch, "data")


def check_test_gradients(
    model: torch.nn.Module,
    loss: Optional[LossOrTask],
    blocks: Dict[str, Dict[str, torch.nn.Parameter]],
    batch: TorchBatch,
) -> None:
    """`check_gradients_nonzero` for test points (`x_test`): the gradients of a task's
    measurement, of the loss otherwise; nothing to check without a loss."""
    if loss is None:
        return
    params = {n: p.detach() for block in blocks.values() for n, p in block.items()}
    check_gradients_nonzero(model, loss, params, batch, "x_test", measurement=is_task(loss))


def loss_name(loss: Any) -> str:
    """The qualified name of a loss function, module or task (for messages)."""
    inner = getattr(loss, "func", None)  # functools.partial
    target = inner if callable(inner) else loss
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{name}" if module and module != "builtins" else str(name)


def check_gradients_nonzero(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: Dict[str, torch.Tensor],
    batch: TorchBatch,
    name: str,
    measurement: bool = False,
) -> None:
    r"""Raise a ValueError if the gradients of the loss at every sample of `batch` are zero.

    One backward pass of a random combination $\sum_i w_i \ell_i(\theta)$ of the
    per-sample losses, $w_i \sim \mathcal{N}(0, 1)$: its gradient
    $\sum_i w_i \nabla_\theta \ell_i$ vanishes (almost surely) only if every per-sample
    gradient does. It counts as zero when its norm is at most
    $\sqrt{t} \max(1, \lVert\theta\rVert)$, $t$ the smallest normal number of the
    parameters' dtype: tiny gradients of confidently fitted points (1e-70 in float64) still
    rank training points, gradients that underflow or vanish identically do not. Every influence of such a batch would be 0: the loss does not
    depend on the parameters at these points (cross-entropy on a model with one output, a
    loss that ignores the model's outputs).

    Models that `vmap` cannot map (data-dependent control flow) are not checked.

    Args:
        model: the model.
        loss: the loss or task.
        params: the parameters of all blocks.
        batch: the batch.
        name: the parameter the batch comes from (for the message).
        measurement: differentiate a task's measurement instead of its loss (test points).
    """
    if len(batch) == 0 or not params:
        return
    first = next(iter(params.values()))
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(len(batch), generator=generator, dtype=first.dtype).to(first.device)
    leaf = {key: value.detach().requires_grad_() for key, value in params.items()}
    try:
        with torch.enable_grad():
            values = create_per_sample_loss_function(model, loss, leaf, measurement)(
                leaf, batch.x, batch.y
            )
            total = (values.reshape(len(batch), -1).sum(1) * weights.to(values.dtype)).sum()
            grads = (
                torch.autograd.grad(total, list(leaf.values()), allow_unused=True)
                if total.requires_grad
                else [None] * len(leaf)
            )
    except _FORWARD_ERRORS:
        return  # the first batch's own checks report errors; vmap-incompatible models pass
    norm = sum(float((g.detach().double() ** 2).sum()) for g in grads if g is not None) ** 0.5
    scale = sum(float((p.detach().double() ** 2).sum()) for p in leaf.values()) ** 0.5
    tiny = torch.finfo(first.dtype).tiny if first.is_floating_point() else 0.0
    if norm <= tiny**0.5 * max(1.0, scale):
        what = "measurement of the task" if measurement and is_task(loss) else "loss"
        raise ValueError(
            f"The gradients of the {what} {loss_name(loss)} with respect to the model's "
            f"parameters are zero at every point of {name!r} ({len(batch)} points, gradient norm "
            f"{norm:.3g}): every influence would be 0 and any ranking meaningless. The "
            "loss does not depend on the parameters at these points; check parameter 'loss' "
            "(e.g. cross_entropy on a model with one output: use mse_loss for regression)."
        )


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


TensorVersions = Dict[str, Tuple[int, int, float]]


def tensor_versions(*models: torch.nn.Module) -> TensorVersions:
    """The identity and the in-place version counter of every parameter and buffer of the
    models, by name, and the sum of every buffer: an optimizer step, `load_state_dict`, a
    replaced parameter or a BatchNorm update in training mode (whose kernel updates the
    running statistics without counting a version) changes them, reading the model does not."""
    versions: TensorVersions = {}
    for index, model in enumerate(models):
        for name, parameter in model.named_parameters():
            versions[f"{index}:{name}"] = (id(parameter), parameter._version, 0.0)
        for name, tensor in model.named_buffers():
            total = float(tensor.detach().double().nan_to_num().sum()) if tensor.numel() else 0.0
            versions[f"{index}:{name}"] = (id(tensor), tensor._version, total)
    return versions


def check_unchanged(fitted: Optional[TensorVersions], *models: torch.nn.Module) -> None:
    """Raise a ValueError naming `fit` if the tensors of the models changed since they were
    fitted (`fitted`, see `tensor_versions`; None: not fitted, nothing to check)."""
    if fitted is None:
        return
    current = tensor_versions(*models)
    if fitted == current:
        return
    changed = sorted(
        {
            key.split(":", 1)[1]
            for key in set(fitted) | set(current)
            if fitted.get(key) != current.get(key)
        }
    )
    raise ValueError(
        f"The model's parameters or buffers {changed[:5]} changed after 'fit' (trained, "
        "loaded or modified in place since): the fitted curvature no longer matches them and "
        "the influences would mix new gradients with the old fit. Call 'fit' again (or "
        "'load_fit' of a fit of the current weights)."
    )
