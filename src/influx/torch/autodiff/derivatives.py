r"""Automatic differentiation of the loss: per-sample gradients, mixed derivatives, curvature
products.

Everything here is stateless and built on `torch.func`: per-sample quantities are
vectorised with `vmap`, never computed in a Python loop over samples. Parameters are
passed as dictionaries `name -> tensor`, as returned by
[get_model_parameters][influx.torch.autodiff.derivatives.get_model_parameters].

The user's module is never touched: every functional evaluation goes through
[functional_forward][influx.torch.autodiff.stateless.functional_forward], which runs the forward pass
of a structure-only copy of the module (one per thread, whose parameters are placeholders
replaced by the given tensors). A fitted influence model can therefore be pickled, saved or
used from another thread while it computes. torch keeps the state of forward-mode
differentiation (`jvp`) per process, not per thread: the functions built on it (mixed
derivatives, Jacobian products, Hessian-vector products) run one thread at a time, the
reverse-mode ones (per-sample gradients) in parallel.

For a model $f_\theta$ and a loss $\ell$, with $\ell_i(\theta) = \ell(f_\theta(x_i), y_i)$
and the batch loss $L(\theta) = \frac{1}{n}\sum_i \ell_i(\theta)$ (the loss function's own
mean reduction):

* per-sample gradients $\nabla_\theta \ell_i$,
* mixed derivatives $\nabla_x \nabla_\theta \ell_i$,
* Hessian-vector products $\nabla^2_\theta L \, v$ (forward-over-reverse),
* Gauss-Newton products $\frac{1}{n}\sum_i \nabla_\theta \ell_i \nabla_\theta \ell_i^\top v$.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union, cast

from torch.func import grad, jvp, vmap
from torch.utils import _pytree as pytree

import torch

from .model_call import (
    LossFunction,
    LossOrTask,
    call_model,
    is_task,
    model_outputs,
    perturbation_entry,
    task_objective,
    vmap_unsupported_modules,
)
from .per_sample import PerSampleGradients
from .stateless import (
    ForwardModeSerialised,
    StructureSignature,
    functional_forward,
    structure_signature,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FunctionalModel",
    "LossFunction",
    "LossOrTask",
    "create_batch_loss_function",
    "create_matrix_jacobian_product_function",
    "create_per_sample_gradient_function",
    "create_per_sample_loss_function",
    "create_per_sample_mixed_derivative_function",
    "flatten_dimensions",
    "get_model_parameters",
    "model_device",
    "tree_to_device",
    "with_frozen",
    "operator_to_dense",
    "unflatten",
]

ParamDict = Dict[str, torch.Tensor]


def get_model_parameters(
    model: torch.nn.Module, detach: bool = True, require_grad_only: bool = True
) -> ParamDict:
    """The model's parameters by name, in `named_parameters()` order.

    Args:
        model: the model.
        detach: return detached tensors (no autograd history).
        require_grad_only: only the parameters with `requires_grad=True`.
    """
    return {
        name: (p.detach() if detach else p)
        for name, p in model.named_parameters()
        if p.requires_grad or not require_grad_only
    }


def flatten_dimensions(
    tensors: Iterable[torch.Tensor],
    shape: Optional[Tuple[int, ...]] = None,
    concat_at: int = -1,
) -> torch.Tensor:
    """Reshape each tensor to `shape` (default: flat) and concatenate along `concat_at`."""
    target = (-1,) if shape is None else shape
    return torch.cat([t.reshape(target) for t in tensors], dim=concat_at)


def with_frozen(params: ParamDict, model: torch.nn.Module) -> Callable[[ParamDict], ParamDict]:
    """Merge trainable `params` with the model's other parameters and buffers."""
    restricted = set(params)
    frozen = {
        name: t.detach()
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
        if name not in restricted
    }

    def merge(p: ParamDict) -> ParamDict:
        return {**frozen, **p}

    return merge


def _at_call_time(
    model: torch.nn.Module,
    make: Callable[[ParamDict], Callable[..., Any]],
) -> Callable[..., Any]:
    """A function `(params, x, y, *rest)` that builds `make(params)` for the parameters it is
    called with (the reference API's form, where the parameters are not known in advance).
    Inputs and targets are moved to the model's device."""

    def call(p: ParamDict, x: Any, y: Any, *rest: Any) -> Any:
        device = model_device(model)
        return make(p)(p, tree_to_device(x, device), tree_to_device(y, device), *rest)

    return call


def tree_to_device(value: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device), value)


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


class FunctionalModel:
    """A module evaluated with given parameters: calling it runs
    [functional_forward][influx.torch.autodiff.stateless.functional_forward] (positional and keyword
    arguments are passed on); other attributes are read from the module (e.g. `config`).

    Args:
        model: the module.
        tensors: its parameters and buffers by name.
        signature: the module's structure when `tensors` were read (computed if None).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tensors: ParamDict,
        signature: Optional[StructureSignature] = None,
    ):
        self.module = model
        self.tensors = tensors
        self.signature = structure_signature(model) if signature is None else signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_forward(self.module, self.tensors, args, self.signature, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["module"], name)


def create_batch_loss_function(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: Optional[ParamDict] = None,
    measurement: bool = False,
) -> Callable[[ParamDict, Any, Any], torch.Tensor]:
    r"""$(\theta, x, y) \mapsto L(\theta)$, the loss of the batch as a function of `params`.

    Parameters of the model not in `params` (and buffers) are held fixed. Without `params`
    (the reference API's form), the parameters are those the returned function is called
    with. `x` and `y` are tensors or structures of tensors; `loss` is a function
    `loss(outputs, y)` or a [Task][influx.torch.data.task.Task], whose `measurement` is used if
    `measurement` is True.
    """
    if params is None:
        return _at_call_time(
            model, lambda p: create_batch_loss_function(model, loss, p, measurement)
        )
    merge = with_frozen(params, model)
    signature = structure_signature(model)
    objective = task_objective(loss, measurement)

    def batch_loss(p: ParamDict, x: Any, y: Any) -> torch.Tensor:
        return objective(FunctionalModel(model, merge(p), signature), x, y)

    return batch_loss


def _unsqueeze(value: Any) -> Any:
    return pytree.tree_map(lambda t: t.unsqueeze(0), value)


def _create_single_sample_loss_function(
    model: torch.nn.Module, loss: LossOrTask, params: ParamDict, measurement: bool = False
) -> Callable[[ParamDict, Any, Any], torch.Tensor]:
    r"""$(\theta, x_i, y_i) \mapsto \ell_i(\theta)$ for one sample without batch dimension."""
    batch_loss = create_batch_loss_function(model, loss, params, measurement)

    def single(p: ParamDict, x: Any, y: Any) -> torch.Tensor:
        return batch_loss(p, _unsqueeze(x), _unsqueeze(y))

    return single


def create_per_sample_loss_function(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: Optional[ParamDict] = None,
    measurement: bool = False,
) -> Callable[[ParamDict, Any, Any], torch.Tensor]:
    r"""$(\theta, x, y) \mapsto (\ell_i(\theta))_i$, vectorised over the batch (one sample at a
    time for a model with recurrent layers, whose kernels `vmap` cannot map)."""
    if params is None:
        return _at_call_time(
            model, lambda p: create_per_sample_loss_function(model, loss, p, measurement)
        )
    single = _create_single_sample_loss_function(model, loss, params, measurement)
    if vmap_unsupported_modules(model):
        # recurrent kernels have no batching rule: one sample at a time
        def loop(p: ParamDict, x: Any, y: Any) -> torch.Tensor:
            n = int(pytree.tree_leaves(x)[0].shape[0])
            return torch.stack(
                [
                    single(
                        p,
                        pytree.tree_map(lambda t, i=i: t[i], x),
                        pytree.tree_map(lambda t, i=i: t[i], y),
                    )
                    for i in range(n)
                ]
            )

        return loop
    return vmap(single, in_dims=(None, 0, 0))  # type: ignore[no-any-return]


def create_per_sample_gradient_function(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: Optional[ParamDict] = None,
    measurement: bool = False,
) -> Callable[[ParamDict, Any, Any], ParamDict]:
    r"""$(\theta, x, y) \mapsto \{\text{name}: (\nabla_\theta \ell_i)_i\}$, shapes `(N, *p.shape)`.

    Vectorised with `vmap` (see [PerSampleGradients][influx.torch.autodiff.per_sample.PerSampleGradients]
    for models that branch on their inputs). With `measurement`, the gradients of the task's
    measurement.
    """
    if params is None:
        return _at_call_time(
            model, lambda p: create_per_sample_gradient_function(model, loss, p, measurement)
        )
    single = _create_single_sample_loss_function(model, loss, params, measurement)
    name, unmappable = type(model).__name__, vmap_unsupported_modules(model)
    if is_task(loss):
        return PerSampleGradients(single, model_name=name, unmappable=unmappable)
    merge = with_frozen(params, model)
    signature = structure_signature(model)

    def outputs(p: ParamDict, x: Any) -> Any:
        return model_outputs(call_model(FunctionalModel(model, merge(p), signature), x))

    return PerSampleGradients(single, outputs, cast(LossFunction, loss), name, unmappable)


def create_per_sample_mixed_derivative_function(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: Optional[ParamDict] = None,
    measurement: bool = False,
) -> Callable[[ParamDict, Any, Any], ParamDict]:
    r"""$(\theta, x, y) \mapsto \{\text{name}: (\nabla_x \nabla_\theta \ell_i)_i\}$.

    Reverse-over-forward: for each input feature $f$ the directional derivative
    $\partial_{x_f} \ell_i$ is a Jacobian-vector product, and its gradient with respect to
    $\theta$ is one backward pass; both are vectorised over features and samples. Each value
    has shape `(N, F, *p.shape)` with $F$ the number of input features. For structured inputs
    the derivative is taken with respect to one tensor of `x` (see
    [perturbation_entry][influx.torch.autodiff.model_call.perturbation_entry]), the others held fixed.
    For a model with recurrent layers (whose kernels `vmap` cannot map over samples) the
    samples are taken one at a time.
    """
    if params is None:
        return _at_call_time(
            model,
            lambda p: create_per_sample_mixed_derivative_function(model, loss, p, measurement),
        )
    single = _create_single_sample_loss_function(model, loss, params, measurement)

    def one_sample(
        p: ParamDict, entry: torch.Tensor, rest: List[Any], spec: Any, index: int, y: Any
    ) -> ParamDict:
        def with_entry(value: torch.Tensor) -> Any:
            return pytree.tree_unflatten(rest[:index] + [value] + rest[index + 1 :], spec)

        def directional(q: ParamDict, direction: torch.Tensor) -> torch.Tensor:
            return jvp(lambda xx: single(q, with_entry(xx), y), (entry,), (direction,))[1]

        directions = torch.eye(entry.numel(), dtype=entry.dtype, device=entry.device).reshape(
            -1, *entry.shape
        )
        return vmap(grad(directional), in_dims=(None, 0))(p, directions)  # type: ignore[no-any-return]

    def mixed(p: ParamDict, x: Any, y: Any) -> ParamDict:
        index, _ = perturbation_entry(x, loss)
        flat, spec = pytree.tree_flatten(x)

        def per_sample(pp: ParamDict, e: torch.Tensor, others: List[Any], yy: Any) -> ParamDict:
            return one_sample(pp, e, others, spec, index, yy)

        if unmappable:  # one sample at a time, vectorised over the features only
            rows = [
                per_sample(
                    p, flat[index][i], [t[i] for t in flat], pytree.tree_map(lambda t, i=i: t[i], y)
                )
                for i in range(int(flat[index].shape[0]))
            ]
            return {name: torch.stack([row[name] for row in rows]) for name in p}
        return vmap(per_sample, in_dims=(None, 0, 0, 0))(p, flat[index], flat, y)  # type: ignore[no-any-return]

    unmappable = bool(vmap_unsupported_modules(model))
    return ForwardModeSerialised(mixed)


def create_matrix_jacobian_product_function(
    model: torch.nn.Module,
    loss: LossOrTask,
    g: Union[torch.Tensor, ParamDict],
    measurement: bool = False,
) -> Callable[..., torch.Tensor]:
    r"""Products of per-sample gradients with the rows of a matrix $G$ `(K, P)`.

    Uses forward-mode derivatives (one Jacobian-vector product per row of $G$), so the
    `(N, P)` matrix of per-sample gradients is never formed. Two forms:

    * `g` a tensor $G$ (the reference API's form): returns
      $(\theta, x, y) \mapsto (g_k \cdot \nabla_\theta \ell_i)_{ki}$, shape `(K, N)`, with
      the columns of $G$ in the order of the trainable parameters of the model;
    * `g` a dict of parameters: returns
      $(\theta, x, y, G) \mapsto (\nabla_\theta \ell_i \cdot g_k)_{ik}$, shape `(N, K)`,
      differentiating with respect to those parameters only.

    Raises:
        TypeError: if `g` is neither a tensor nor a dict of tensors.
    """
    if isinstance(g, torch.Tensor):
        matrix = g

        def product_with_fixed_matrix(p: ParamDict, x: Any, y: Any) -> torch.Tensor:
            device = model_device(model)
            function = create_matrix_jacobian_product_function(model, loss, p, measurement)
            return function(
                p, tree_to_device(x, device), tree_to_device(y, device), matrix.to(device)
            ).T

        return product_with_fixed_matrix
    if not isinstance(g, Mapping):
        raise TypeError(
            "Parameter 'g' must be a torch.Tensor (K, P) or a dict of parameters, got "
            f"{type(g).__name__}."
        )
    params = dict(g)
    per_sample_loss = create_per_sample_loss_function(model, loss, params, measurement)
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]

    def one_direction(p: ParamDict, x: Any, y: Any, direction: torch.Tensor) -> torch.Tensor:
        tangent = {n: t.reshape(s) for n, t, s in zip(names, torch.split(direction, sizes), shapes)}
        return jvp(lambda q: per_sample_loss(q, x, y), (p,), (tangent,))[1]

    def product(p: ParamDict, x: Any, y: Any, g: torch.Tensor) -> torch.Tensor:
        return vmap(one_direction, in_dims=(None, None, None, 0), out_dims=1)(p, x, y, g)

    return ForwardModeSerialised(product)


def unflatten(vector: torch.Tensor, params: ParamDict) -> ParamDict:
    """Split the last dimension of `vector` into tensors shaped like `params`."""
    sizes = [p.numel() for p in params.values()]
    lead = vector.shape[:-1]
    return {
        name: chunk.reshape(*lead, *p.shape)
        for (name, p), chunk in zip(params.items(), torch.split(vector, sizes, dim=-1))
    }


def operator_to_dense(
    apply: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The matrix of a linear map given by its action on rows, `chunk_size` rows at a time."""
    eye = torch.eye(size, dtype=dtype, device=device)
    return torch.cat([apply(eye[i : i + chunk_size]) for i in range(0, size, chunk_size)])
