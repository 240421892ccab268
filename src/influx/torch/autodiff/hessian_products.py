r"""Hessian-vector products and dense Hessians of the loss of a batch.

The strategy of a product is chosen per call, by the number $K$ of vectors and the number
$P$ of parameters:

* reverse-over-reverse with `torch.autograd` (one forward and one differentiable backward
  pass shared by all vectors, then one backward pass per vector) whenever the parameters do
  not require gradients themselves; on small models ($P \le$
  [HVP_REVERSE_VECTORISED_MAX_PARAMETERS][influx.torch.autodiff.hessian_products.HVP_REVERSE_VECTORISED_MAX_PARAMETERS])
  the per-vector passes are batched into one, and with at least as many vectors as
  parameters the Hessian's columns are taken in one batched pass;
* when the result must stay differentiable in the parameters, reverse-over-reverse
  vectorised with `vmap` on small models and forward-over-reverse (a Jacobian-vector product
  of the gradient map, vectorised over the vectors, one thread at a time: forward-mode state
  is per process) otherwise.

The thresholds were measured in `benchmarks/bench_hvp.py`. Every strategy gives the same
products (to rounding): the tests compare each with `torch.func.hessian`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from torch.func import grad, jvp, vjp, vmap
from torch.utils import _pytree as pytree

import torch

from .derivatives import (
    LossOrTask,
    create_batch_loss_function,
    model_device,
    tree_to_device,
    unflatten,
)
from .model_call import vmap_unsupported_modules
from .stateless import ForwardModeSerialised, MathAttentionOnFailure

__all__ = [
    "HESSIAN_CHUNK_BUDGET",
    "HVP_REVERSE_MAX_ROWS",
    "HVP_REVERSE_VECTORISED_MAX_PARAMETERS",
    "batch_hessian",
    "create_batch_hessian_function",
    "create_batch_hvp_function",
    "create_batch_hvp_reverse_function",
    "hvp",
]

logger = logging.getLogger(__name__)

ParamDict = Dict[str, torch.Tensor]


HVP_REVERSE_MAX_ROWS = 2**31
"""Largest number of vectors for which
[create_batch_hvp_function][influx.torch.autodiff.hessian_products.create_batch_hvp_function] computes
Hessian-vector products with `torch.autograd` reverse-over-reverse
([create_batch_hvp_reverse_function][influx.torch.autodiff.hessian_products.create_batch_hvp_reverse_function]);
more vectors go through the vectorised `torch.func` products. Measured in
`benchmarks/bench_hvp.py` on a quiet machine: the `torch.autograd` product is the fastest at
every $K$ from 1 to 64 on models of 31, 2,410 and 99,126 parameters, so by default it is
always taken (a smaller value, e.g. 0, forces the vectorised products)."""

HVP_REVERSE_ROWS_CHUNK = 32
"""Number of vectors whose second backward pass is batched into one (`is_grads_batched`) in
[create_batch_hvp_reverse_function][influx.torch.autodiff.hessian_products.create_batch_hvp_reverse_function]
on small models: the intermediate tensors of that pass are held once per vector."""

HVP_REVERSE_VECTORISED_MAX_PARAMETERS = 10_000
"""Up to this many parameters, Hessian-vector products of several vectors are vectorised over
the vectors: the `torch.autograd` product batches its per-vector backward passes, and the
`torch.func` products (taken for more than
[HVP_REVERSE_MAX_ROWS][influx.torch.autodiff.hessian_products.HVP_REVERSE_MAX_ROWS] vectors or when
the result must stay differentiable) are reverse-over-reverse under `vmap`; above it, one
backward pass per vector, respectively forward-over-reverse. Measured in
`benchmarks/bench_hvp.py`: on models of 31 and 2,410 parameters batching is 1.5-9x faster
for 10-50 vectors; on 99,126 parameters it is 20-30 % slower than one pass per vector (the
arithmetic dominates and the batched intermediates leave the cache)."""


def create_batch_hvp_reverse_function(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: ParamDict,
    vectorise_rows: Optional[bool] = None,
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y, V) \mapsto V \nabla^2_\theta L(\theta)$, reverse-over-reverse.

    One forward pass and one backward pass that records its own graph give
    $g(\theta) = \nabla_\theta L(\theta)$; each row $v$ of `V` `(K, P)` is then one more
    backward pass through that graph,

    $$ H v = \nabla_\theta \left( g(\theta)^\top v \right), $$

    so the forward pass and the first backward pass are shared by the $K$ products. With
    `vectorise_rows` (by default on models of at most
    [HVP_REVERSE_VECTORISED_MAX_PARAMETERS][influx.torch.autodiff.hessian_products.HVP_REVERSE_VECTORISED_MAX_PARAMETERS]
    parameters) the backward passes of up to
    [HVP_REVERSE_ROWS_CHUNK][influx.torch.autodiff.hessian_products.HVP_REVERSE_ROWS_CHUNK] rows are
    one batched backward pass (`is_grads_batched`); a graph whose backward pass cannot be
    batched falls back to one pass per row. With at least as many vectors as parameters
    ($K \ge P$) the $P$ columns of the Hessian are taken in one batched backward pass and
    multiplied with `V`. The cost is one forward and about $1 + 2\min(K, P)$ backward passes
    of the batch, without the fixed cost of `torch.func`'s transforms. Only reverse-mode
    derivatives are used, so several threads may run it at once. The Hessian is never formed.
    """
    batch_loss = create_batch_loss_function(model, loss, params)
    names = list(params)
    size = sum(p.numel() for p in params.values())
    batched = (
        [size <= HVP_REVERSE_VECTORISED_MAX_PARAMETERS]
        if vectorise_rows is None
        else [vectorise_rows]
    )

    def backward(
        outputs: List[torch.Tensor],
        leaves: List[torch.Tensor],
        directions: List[torch.Tensor],
        retain: bool,
        is_batched: bool,
    ) -> Tuple[Optional[torch.Tensor], ...]:
        return torch.autograd.grad(
            outputs,
            leaves,
            directions,
            retain_graph=retain,
            allow_unused=True,
            is_grads_batched=is_batched,
        )

    def hvp(p: ParamDict, x: Any, y: Any, vs: torch.Tensor) -> torch.Tensor:
        result = torch.zeros(vs.shape, dtype=vs.dtype, device=vs.device)
        if vs.shape[0] == 0:
            return result
        with torch.enable_grad():
            leaves = [p[n].detach().requires_grad_(True) for n in names]
            value = batch_loss(dict(zip(names, leaves)), x, y)
            first = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
            # gradients that do not depend on the parameters (a loss linear in them) add
            # nothing to the Hessian
            live = [k for k, g in enumerate(first) if g is not None and g.requires_grad]
            if not live:
                return result
            outputs = [first[k] for k in live]
            offsets = [0]
            for leaf in leaves:
                offsets.append(offsets[-1] + leaf.numel())
            if vs.shape[0] >= offsets[-1]:
                # at least as many vectors as parameters: the matrix itself, its P columns
                # in one batched backward pass, then one matrix product
                eye = torch.eye(offsets[-1], dtype=vs.dtype, device=vs.device)
                directions = [
                    eye[:, offsets[k] : offsets[k + 1]].reshape(-1, *leaves[k].shape) for k in live
                ]
                columns = backward(outputs, leaves, directions, False, True)
                matrix = torch.zeros(offsets[-1], offsets[-1], dtype=vs.dtype, device=vs.device)
                for k, block in enumerate(columns):
                    if block is not None:
                        matrix[:, offsets[k] : offsets[k + 1]] = block.reshape(offsets[-1], -1)
                return (vs @ matrix).detach()
            step = HVP_REVERSE_ROWS_CHUNK if batched[0] and vs.shape[0] > 1 else 1
            start = 0
            while start < vs.shape[0]:
                rows = vs[start : start + step]
                retain = start + step < vs.shape[0]
                try:
                    if step > 1:
                        directions = [
                            rows[:, offsets[k] : offsets[k + 1]].reshape(-1, *leaves[k].shape)
                            for k in live
                        ]
                    else:
                        directions = [
                            rows[0, offsets[k] : offsets[k + 1]].view_as(leaves[k]) for k in live
                        ]
                    second = backward(outputs, leaves, directions, retain or step > 1, step > 1)
                except (RuntimeError, NotImplementedError) as error:
                    if step == 1:
                        raise
                    logger.debug(
                        "Batched backward pass failed (%s): one backward pass per vector.", error
                    )
                    batched[0] = False
                    step = 1
                    continue
                for k, block in enumerate(second):
                    if block is not None:
                        result[start : start + step, offsets[k] : offsets[k + 1]] = block.reshape(
                            rows.shape[0], -1
                        )
                start += step
        return result

    return MathAttentionOnFailure(hvp)


def hvp(
    func: Callable[[ParamDict], torch.Tensor],
    params: ParamDict,
    vec: ParamDict,
    reverse_only: bool = True,
) -> ParamDict:
    r"""The Hessian-vector product $\nabla^2 f(\theta)\, v$ of a scalar function of a
    dictionary of parameters.

    With `reverse_only=True`, reverse-over-reverse: the vector-Jacobian product of the
    gradient map, $v \mapsto v^\top \nabla(\nabla f)$ (the Hessian is symmetric). Otherwise
    forward-over-reverse, $\frac{d}{dt}\nabla f(\theta + t v)\big|_{t=0}$, falling back to
    reverse-over-reverse where torch's forward-mode rules fail for an operation of `func`.

    Args:
        func: $f$, a scalar function of a dict of tensors.
        params: $\theta$, the point at which the Hessian is taken.
        vec: $v$, a dict with the keys and shapes of `params`.
        reverse_only: use reverse mode only.

    Returns:
        $\nabla^2 f(\theta) v$ as a dict shaped like `params`.
    """
    if not reverse_only:
        try:
            return jvp(grad(func), (params,), (vec,))[1]  # type: ignore[no-any-return]
        except (RuntimeError, NotImplementedError) as error:
            logger.debug("Forward-over-reverse failed (%s): using reverse mode.", error)
    vjp_fn = vjp(grad(func), params)[1]
    return vjp_fn(vec)[0]  # type: ignore[no-any-return]


def create_batch_hvp_function(
    model: torch.nn.Module,
    loss: LossOrTask,
    reverse_only: Union[bool, ParamDict] = True,
    params: Optional[ParamDict] = None,
    reverse_max_rows: Optional[int] = None,
    vectorised_reverse_max_parameters: Optional[int] = None,
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y, v) \mapsto \nabla^2_\theta L(\theta)\, v$, Hessian-vector products of
    the loss of a batch, for a vector `v` `(P,)` or for every row of a matrix `V` `(K, P)`.

    Two strategies, vectorised over the rows of `V`; the Hessian is never formed:

    * forward-over-reverse, $H v = \frac{d}{dt} \nabla_\theta L(\theta + t v)\big|_{t=0}$,
      a Jacobian-vector product of the gradient map (the default when parameters are given);
    * reverse-over-reverse, $H v = \nabla_\theta (\nabla_\theta L \cdot v)$ through a
      vector-Jacobian product of the gradient map (with `reverse_only=True`, the default of
      the reference API's form). It needs only the backward rules of the model and the loss.

    Forward-mode rules are missing or wrong for some layers and losses in some torch versions
    (e.g. a `Conv1d` bias alone with `smooth_l1_loss` in float32); any failure of the
    forward-over-reverse product switches the returned function to reverse-over-reverse for
    good, with the same result.

    Two forms:

    * `create_batch_hvp_function(model, loss, reverse_only=True)` (the reference API's form):
      the products are taken with respect to the parameters the function is called with;
    * `create_batch_hvp_function(model, loss, params)` or `(..., params=params)`: with respect
      to `params`, the model's other parameters and buffers held fixed.

    Args:
        model: the model.
        loss: the loss function (mean reduction).
        reverse_only: use reverse-over-reverse from the start (a dict of parameters passed
            here is taken as `params`).
        params: the parameters to differentiate with respect to.
    """
    if isinstance(reverse_only, Mapping):
        if params is not None:
            raise TypeError(
                "Parameter 'params' was given twice: as the third positional argument and by "
                "keyword."
            )
        return _create_rows_hvp_function(
            model,
            loss,
            dict(reverse_only),
            False,
            reverse_max_rows,
            vectorised_reverse_max_parameters,
        )
    if params is not None:
        return _create_rows_hvp_function(
            model,
            loss,
            params,
            bool(reverse_only),
            reverse_max_rows,
            vectorised_reverse_max_parameters,
        )

    def hvp_at_call_time(p: ParamDict, x: Any, y: Any, vec: torch.Tensor) -> torch.Tensor:
        device = model_device(model)
        function = _create_rows_hvp_function(model, loss, p, reverse_only=bool(reverse_only))
        rows = vec.to(device).reshape(-1, vec.shape[-1])
        return function(p, tree_to_device(x, device), tree_to_device(y, device), rows).reshape(
            vec.shape
        )

    return hvp_at_call_time


def _create_rows_hvp_function(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: ParamDict,
    reverse_only: bool,
    reverse_max_rows: Optional[int] = None,
    vectorised_reverse_max_parameters: Optional[int] = None,
) -> Callable[[ParamDict, Any, Any, torch.Tensor], torch.Tensor]:
    """Hessian-vector products with the rows of `V` `(K, P)` with respect to `params`, the
    strategy chosen per call (see `create_batch_hvp_function`)."""
    batch_loss = create_batch_loss_function(model, loss, params)
    names = list(params)
    size = sum(p.numel() for p in params.values())
    max_rows = HVP_REVERSE_MAX_ROWS if reverse_max_rows is None else reverse_max_rows
    max_parameters = (
        HVP_REVERSE_VECTORISED_MAX_PARAMETERS
        if vectorised_reverse_max_parameters is None
        else vectorised_reverse_max_parameters
    )
    autograd_reverse = create_batch_hvp_reverse_function(
        model, loss, params, vectorise_rows=size <= max_parameters
    )

    def forward_over_reverse(p: ParamDict, x: Any, y: Any, v: torch.Tensor) -> torch.Tensor:
        def gradient(q: ParamDict) -> ParamDict:
            return grad(batch_loss)(q, x, y)  # type: ignore[no-any-return]

        tangent = jvp(gradient, (p,), (unflatten(v, p),))[1]
        return torch.cat([tangent[n].reshape(-1) for n in names])

    def reverse_over_reverse(p: ParamDict, x: Any, y: Any, vs: torch.Tensor) -> torch.Tensor:
        pullback = vjp(lambda q: grad(batch_loss)(q, x, y), p)[1]

        def one_row(v: torch.Tensor) -> torch.Tensor:
            product = pullback(unflatten(v, p))[0]
            return torch.cat([product[n].reshape(-1) for n in names])

        return vmap(one_row)(vs)  # type: ignore[no-any-return]

    use_reverse = [reverse_only]

    def forward_path(p: ParamDict, x: Any, y: Any, vs: torch.Tensor) -> torch.Tensor:
        if not use_reverse[0]:
            try:
                return vmap(forward_over_reverse, in_dims=(None, None, None, 0))(p, x, y, vs)  # type: ignore[no-any-return]
            except (RuntimeError, NotImplementedError) as error:
                logger.debug(
                    "Forward-over-reverse Hessian-vector product failed (%s): using "
                    "reverse-over-reverse from now on.",
                    error,
                )
                use_reverse[0] = True
        return reverse_over_reverse(p, x, y, vs)

    serialised = ForwardModeSerialised(forward_path)

    def rows_hvp(p: ParamDict, x: Any, y: Any, vs: torch.Tensor) -> torch.Tensor:
        # Reverse mode only (no lock needed) for a few vectors, for at least as many vectors
        # as parameters, and vectorised over the vectors on small models; forward-over-reverse
        # (one thread at a time) otherwise.
        rows = int(vs.shape[0])
        tracked = any(t.requires_grad for t in p.values())  # results must stay differentiable
        if not tracked and (rows <= max_rows or rows >= size):
            return autograd_reverse(p, x, y, vs)
        if reverse_only or size <= max_parameters:
            return reverse_over_reverse(p, x, y, vs)
        return serialised(p, x, y, vs)  # type: ignore[no-any-return]

    return MathAttentionOnFailure(rows_hvp)


HESSIAN_CHUNK_BUDGET = 2**17
"""Default number of (Hessian column, sample) pairs processed at once by
[batch_hessian][influx.torch.autodiff.hessian_products.batch_hessian]: enough to keep vectorised kernels busy, few
enough for the intermediate activations (one copy per pair) to stay small."""


def batch_hessian(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: ParamDict,
    x: Any,
    y: Any,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The Hessian of the loss of one batch with respect to `params`, `chunk_size` columns at
    a time (see [create_batch_hessian_function][influx.torch.autodiff.hessian_products.create_batch_hessian_function])."""
    return create_batch_hessian_function(model, loss, params)(params, x, y, chunk_size)


def create_batch_hessian_function(
    model: torch.nn.Module, loss: LossOrTask, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor, Optional[int]], torch.Tensor]:
    r"""$(\theta, x, y, c) \mapsto \nabla^2_\theta L(\theta)$, the dense Hessian `(P, P)` of the
    batch loss, $c$ columns at a time (None: the default chunk size of
    [batch_hessian][influx.torch.autodiff.hessian_products.batch_hessian]).

    Reverse-over-reverse: one forward pass and one backward pass that records its graph give
    the gradient map $g(\theta) = \nabla_\theta L(\theta)$ and its vector-Jacobian product
    $u \mapsto \nabla_\theta (g(\theta)^\top u) = H u$; the columns of the identity are then
    pushed through that product $c$ at a time, vectorised with `vmap`. The forward pass and
    the first backward pass are shared by all $P$ columns, and only reverse-mode derivatives
    are used (several threads may run it at once). The transformed functions are built here,
    once. For a model with recurrent layers the columns are taken with `torch.autograd`
    ([create_batch_hvp_reverse_function][influx.torch.autodiff.hessian_products.create_batch_hvp_reverse_function]),
    whose graphs also hold packed sequences.
    """
    if vmap_unsupported_modules(model):
        # recurrent kernels: torch.autograd only (torch.func's wrappers fail on packed
        # sequences), the P columns in one batched backward pass
        reverse = create_batch_hvp_reverse_function(model, loss, params)

        def dense_by_autograd(
            p: ParamDict, x: Any, y: Any, chunk_size: Optional[int] = None
        ) -> torch.Tensor:
            first = next(iter(p.values()))
            size = sum(t.numel() for t in p.values())
            eye = torch.eye(size, dtype=first.dtype, device=first.device)
            return reverse(p, x, y, eye)  # type: ignore[no-any-return]

        return MathAttentionOnFailure(dense_by_autograd, "Hessian")
    batch_loss = create_batch_loss_function(model, loss, params)
    names = list(params)
    gradient = grad(batch_loss)

    def dense(p: ParamDict, x: Any, y: Any, chunk_size: Optional[int] = None) -> torch.Tensor:
        size = sum(t.numel() for t in p.values())
        first = next(iter(p.values()))
        if chunk_size is None:
            chunk_size = max(
                1, HESSIAN_CHUNK_BUDGET // max(1, int(pytree.tree_leaves(x)[0].shape[0]))
            )
        step = max(1, min(size, int(chunk_size)))
        _, pullback = vjp(lambda q: gradient(q, x, y), p)  # type: ignore[misc]
        columns = vmap(pullback)
        result = torch.empty(size, size, dtype=first.dtype, device=first.device)
        for start in range(0, size, step):
            stop = min(size, start + step)
            basis = torch.zeros(stop - start, size, dtype=first.dtype, device=first.device)
            basis[:, start:stop].fill_diagonal_(1.0)
            rows = columns(unflatten(basis, p))[0]
            result[start:stop] = torch.cat([rows[n].reshape(stop - start, -1) for n in names], 1)
        return result

    return MathAttentionOnFailure(dense, "Hessian")
