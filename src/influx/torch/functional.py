r"""Pure tensor functions: per-sample gradients, mixed derivatives, curvature products.

Everything here is stateless and built on `torch.func`: per-sample quantities are
vectorised with `vmap`, never computed in a Python loop over samples. Parameters are
passed as dictionaries `name -> tensor`, as returned by
[get_model_parameters][influx.torch.functional.get_model_parameters].

The user's module is never touched: every functional evaluation goes through
[functional_forward][influx.torch.functional.functional_forward], which runs the forward pass
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
* Hessian-vector products $\nabla^2_\theta L \, v$ (reverse-over-reverse for a few vectors,
  forward-over-reverse for many),
* Gauss-Newton products $\frac{1}{n}\sum_i \nabla_\theta \ell_i \nabla_\theta \ell_i^\top v$.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

logger = logging.getLogger(__name__)

__all__ = [
    "LossFunction",
    "flatten_dimensions",
    "functional_forward",
    "get_model_parameters",
    "create_batch_loss_function",
    "create_per_sample_loss_function",
    "create_per_sample_gradient_function",
    "create_per_sample_mixed_derivative_function",
    "create_matrix_jacobian_product_function",
    "create_batch_hvp_function",
    "create_batch_hvp_reverse_function",
    "HVP_REVERSE_MAX_ROWS",
    "HVP_REVERSE_VECTORISED_MAX_PARAMETERS",
    "hessian",
    "create_batch_hessian_function",
    "gauss_newton",
    "operator_to_dense",
    "LowRankProductRepresentation",
    "randomized_nystroem_approximation",
    "nystroem_sketch",
]

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
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


StructureSignature = Tuple[Tuple[str, type, Tuple[str, ...], Tuple[str, ...]], ...]


def _structure_signature(model: torch.nn.Module) -> StructureSignature:
    """The module tree as names and types of submodules and of their parameters and buffers."""
    return tuple(
        (name, type(module), tuple(module._parameters), tuple(module._buffers))
        for name, module in model.named_modules(remove_duplicate=False)
    )


def _placeholder(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A tensor without storage (device `meta`) with the shape and dtype of `tensor`."""
    if tensor is None:
        return None
    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
    return empty


def _structure_copy(module: torch.nn.Module, memo: Dict[int, Any]) -> torch.nn.Module:
    """A copy of `module` sharing its code and settings but none of its tensors.

    Submodules are copied recursively, parameters and buffers are replaced by placeholders
    (shared objects stay shared, so tied weights stay tied), and the containers of the module
    are copied (but for its hook registries), so that swapping tensors into the copy never
    changes the original.
    """
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[no-any-return]
    cls = type(module)
    shell = cls.__new__(cls)  # no __init__, no __getstate__ (parametrized modules refuse it)
    memo[id(module)] = shell
    state = shell.__dict__
    for key, value in module.__dict__.items():
        # Containers the forward pass may write (tensor dicts, weight lists of recurrent
        # layers) are the copy's own; hook registries stay shared, so that hooks added to or
        # removed from the module apply to the copy as they would to the module.
        own = isinstance(value, (dict, list, set)) and "hooks" not in key
        state[key] = copy.copy(value) if own else value
    for kind in ("_parameters", "_buffers"):
        tensors = state[kind]
        for name, tensor in tensors.items():
            if tensor is not None and id(tensor) not in memo:
                memo[id(tensor)] = _placeholder(tensor)
            tensors[name] = None if tensor is None else memo[id(tensor)]
    children = state["_modules"]
    for name, child in children.items():
        children[name] = None if child is None else _structure_copy(child, memo)
    return shell


class _StructureCopies(threading.local):
    """Per thread: the structure-only copy of each module, with the module's structure when
    the copy was made. Keys are weak: a copy goes when its module goes."""

    def __init__(self) -> None:
        self.copies: "weakref.WeakKeyDictionary[torch.nn.Module, Tuple[StructureSignature, torch.nn.Module, List[torch.nn.Module]]]" = weakref.WeakKeyDictionary()


_STRUCTURE_COPIES = _StructureCopies()


def _thread_structure_copy(
    model: torch.nn.Module, signature: StructureSignature
) -> torch.nn.Module:
    """This thread's structure-only copy of `model` (built on first use, rebuilt if the
    module's structure changed), with the train/eval flags of `model`'s submodules."""
    copies = _STRUCTURE_COPIES.copies
    entry = copies.get(model)
    if entry is None or entry[0] != signature:
        try:
            shell = _structure_copy(model, {})
        except Exception as error:  # a module type that cannot be rebuilt from its state
            logger.warning(
                "Cannot copy the structure of %s (%s: %s): evaluating the module itself, whose "
                "parameters are swapped while a computation runs (not thread-safe).",
                type(model).__name__,
                type(error).__name__,
                error,
            )
            shell = model
        entry = (signature, shell, list(shell.modules()))
        copies[model] = entry
    _, shell, shell_modules = entry
    for original, duplicate in zip(model.modules(), shell_modules):
        duplicate.training = original.training
    return shell


def functional_forward(
    model: torch.nn.Module,
    tensors: ParamDict,
    args: Tuple[Any, ...],
    signature: Optional[StructureSignature] = None,
) -> Any:
    r"""$f_\theta(\text{args})$ with the parameters and buffers in `tensors`, without touching
    `model`.

    The forward pass runs on this thread's structure-only copy of `model` (see the module
    docstring), through `torch.func.functional_call`, so it composes with `grad`, `vmap` and
    `jvp`. The user's module is never modified (only its train/eval flags are read), and
    several threads can evaluate the same module at once.

    Args:
        model: the module whose forward pass is evaluated.
        tensors: every parameter and buffer of `model` by name (tied parameters under one of
            their names).
        args: the positional arguments of the forward pass.
        signature: the module's structure when the caller read its tensors (computed if
            None); a copy made for another structure is rebuilt.
    """
    if signature is None:
        signature = _structure_signature(model)
    return functional_call(_thread_structure_copy(model, signature), tensors, args)


_FORWARD_MODE_LOCK = threading.RLock()
"""Held while a function that uses forward-mode derivatives (`torch.func.jvp`) runs: torch
keeps the levels of forward-mode AD in process-wide state, so two threads must not use them
at the same time. Reverse-mode functions (per-sample gradients) run concurrently."""


class ForwardModeSerialised:
    """Wraps a function that uses forward-mode derivatives so that one thread at a time runs
    it (see the module docstring); any other function runs in parallel with it.

    Args:
        function: the function to wrap.
    """

    def __init__(self, function: Callable[..., Any]):
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _FORWARD_MODE_LOCK:
            return self.function(*args, **kwargs)


def _with_frozen(params: ParamDict, model: torch.nn.Module) -> Callable[[ParamDict], ParamDict]:
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


def create_batch_loss_function(
    model: torch.nn.Module, loss: LossFunction, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y) \mapsto L(\theta)$, the loss of the batch as a function of `params`.

    Parameters of the model not in `params` (and buffers) are held fixed.
    """
    merge = _with_frozen(params, model)
    signature = _structure_signature(model)

    def batch_loss(p: ParamDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(functional_forward(model, merge(p), (x,), signature), y)

    return batch_loss


def _create_single_sample_loss_function(
    model: torch.nn.Module, loss: LossFunction, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x_i, y_i) \mapsto \ell_i(\theta)$ for one sample without batch dimension."""
    batch_loss = create_batch_loss_function(model, loss, params)

    def single(p: ParamDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return batch_loss(p, x.unsqueeze(0), y.unsqueeze(0))

    return single


def create_per_sample_loss_function(
    model: torch.nn.Module, loss: LossFunction, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y) \mapsto (\ell_i(\theta))_i$, vectorised over the batch."""
    single = _create_single_sample_loss_function(model, loss, params)
    return vmap(single, in_dims=(None, 0, 0))  # type: ignore[no-any-return]


def create_per_sample_gradient_function(
    model: torch.nn.Module, loss: LossFunction, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor], ParamDict]:
    r"""$(\theta, x, y) \mapsto \{\text{name}: (\nabla_\theta \ell_i)_i\}$, shapes `(N, *p.shape)`."""
    single = _create_single_sample_loss_function(model, loss, params)
    return vmap(grad(single), in_dims=(None, 0, 0))  # type: ignore[no-any-return]


def create_per_sample_mixed_derivative_function(
    model: torch.nn.Module, loss: LossFunction, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor], ParamDict]:
    r"""$(\theta, x, y) \mapsto \{\text{name}: (\nabla_x \nabla_\theta \ell_i)_i\}$.

    Reverse-over-forward: for each input feature $f$ the directional derivative
    $\partial_{x_f} \ell_i$ is a Jacobian-vector product, and its gradient with respect to
    $\theta$ is one backward pass; both are vectorised over features and samples. Each value
    has shape `(N, F, *p.shape)` with $F$ the number of input features.
    """
    single = _create_single_sample_loss_function(model, loss, params)

    def one_sample(p: ParamDict, x: torch.Tensor, y: torch.Tensor) -> ParamDict:
        def directional(q: ParamDict, direction: torch.Tensor) -> torch.Tensor:
            return jvp(lambda xx: single(q, xx, y), (x,), (direction,))[1]

        directions = torch.eye(x.numel(), dtype=x.dtype, device=x.device).reshape(-1, *x.shape)
        return vmap(grad(directional), in_dims=(None, 0))(p, directions)  # type: ignore[no-any-return]

    return ForwardModeSerialised(vmap(one_sample, in_dims=(None, 0, 0)))


def create_matrix_jacobian_product_function(
    model: torch.nn.Module, loss: LossFunction, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y, g) \mapsto (\nabla_\theta \ell_i \cdot g_k)_{ik}$, shape `(N, K)`.

    Uses forward-mode derivatives (one Jacobian-vector product per row of `g`, `(K, P)`),
    so the `(N, P)` matrix of per-sample gradients is never formed.
    """
    per_sample_loss = create_per_sample_loss_function(model, loss, params)
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]

    def one_direction(
        p: ParamDict, x: torch.Tensor, y: torch.Tensor, direction: torch.Tensor
    ) -> torch.Tensor:
        tangent = {n: t.reshape(s) for n, t, s in zip(names, torch.split(direction, sizes), shapes)}
        return jvp(lambda q: per_sample_loss(q, x, y), (p,), (tangent,))[1]

    def product(p: ParamDict, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
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


HVP_REVERSE_MAX_ROWS = 16
"""Largest number of vectors for which
[create_batch_hvp_function][influx.torch.functional.create_batch_hvp_function] computes
Hessian-vector products reverse-over-reverse (one forward and one differentiable backward
pass, then one backward pass per vector); more vectors go through the vectorised
forward-over-reverse product. Measured in `benchmarks/bench_hvp.py`."""

HVP_REVERSE_VECTORISED_MAX_PARAMETERS = 10_000
"""Up to this many parameters, [create_batch_hvp_function][influx.torch.functional.create_batch_hvp_function]
computes the products of more than [HVP_REVERSE_MAX_ROWS][influx.torch.functional.HVP_REVERSE_MAX_ROWS]
vectors reverse-over-reverse too, vectorised over the vectors with `vmap`; above it,
forward-over-reverse. Measured in `benchmarks/bench_hvp.py`: on models of 31 and 2,410
parameters the vectorised reverse-over-reverse product is the faster one (on the logistic
regression by an order of magnitude: torch's forward-mode rule of
`binary_cross_entropy_with_logits` is a slow Python decomposition), on 99,126 parameters the
forward-over-reverse one."""


def create_batch_hvp_reverse_function(
    model: torch.nn.Module, loss: LossFunction, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y, V) \mapsto V \nabla^2_\theta L(\theta)$, reverse-over-reverse.

    One forward pass and one backward pass that records its own graph give
    $g(\theta) = \nabla_\theta L(\theta)$; each row $v$ of `V` `(K, P)` is then one more
    backward pass through that graph,

    $$ H v = \nabla_\theta \left( g(\theta)^\top v \right), $$

    so the forward pass and the first backward pass are shared by the $K$ products. With at
    least as many vectors as parameters ($K \ge P$) the $P$ columns of the Hessian are taken
    in one batched backward pass and multiplied with `V`. The cost is one forward and about
    $1 + 2\min(K, P)$ backward passes of the batch: the cheapest product for one or
    a few vectors, without the fixed cost of `torch.func`'s transforms. Only reverse-mode
    derivatives are used, so several threads may run it at once. The Hessian is never formed.
    """
    batch_loss = create_batch_loss_function(model, loss, params)
    names = list(params)

    def hvp(p: ParamDict, x: torch.Tensor, y: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
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
                columns = torch.autograd.grad(
                    outputs, leaves, directions, allow_unused=True, is_grads_batched=True
                )
                matrix = torch.zeros(offsets[-1], offsets[-1], dtype=vs.dtype, device=vs.device)
                for k, block in enumerate(columns):
                    if block is not None:
                        matrix[:, offsets[k] : offsets[k + 1]] = block.reshape(offsets[-1], -1)
                return (vs @ matrix).detach()
            last = vs.shape[0] - 1
            for row, v in enumerate(vs):
                directions = [v[offsets[k] : offsets[k + 1]].view_as(leaves[k]) for k in live]
                second = torch.autograd.grad(
                    outputs, leaves, directions, retain_graph=row < last, allow_unused=True
                )
                for k, block in enumerate(second):
                    if block is not None:
                        result[row, offsets[k] : offsets[k + 1]] = block.reshape(-1)
        return result

    return hvp


def create_batch_hvp_function(
    model: torch.nn.Module,
    loss: LossFunction,
    params: ParamDict,
    reverse_max_rows: Optional[int] = None,
    vectorised_reverse_max_parameters: Optional[int] = None,
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y, V) \mapsto V \nabla^2_\theta L(\theta)$ for the rows of `V` `(K, P)`.

    The strategy is chosen per call by $K$: up to `reverse_max_rows` rows (default
    [HVP_REVERSE_MAX_ROWS][influx.torch.functional.HVP_REVERSE_MAX_ROWS]), or at least as many
    rows as parameters, reverse-over-reverse
    ([create_batch_hvp_reverse_function][influx.torch.functional.create_batch_hvp_reverse_function]);
    more rows, for at most `vectorised_reverse_max_parameters` parameters (default
    [HVP_REVERSE_VECTORISED_MAX_PARAMETERS][influx.torch.functional.HVP_REVERSE_VECTORISED_MAX_PARAMETERS]),
    reverse-over-reverse vectorised over the rows (the vector-Jacobian product of the gradient
    map, as in [create_batch_hessian_function][influx.torch.functional.create_batch_hessian_function]);
    otherwise forward-over-reverse: $H v = \frac{d}{dt} \nabla_\theta L(\theta + t v)\big|_{t=0}$,
    a Jacobian-vector product of the gradient map, vectorised over the rows of `V`; the
    backward pass depends on the primal values only, so the rows of `V` batch into plain
    matrix products. Where torch's forward-mode rules fail for the loss (e.g. `mse_loss` in
    some torch versions), it falls back to reverse-over-forward,
    $H v = \nabla_\theta (\nabla_\theta L \cdot v)$, with the same result. The transformed
    functions are built once, here, not per call. The Hessian is never formed.
    """
    batch_loss = create_batch_loss_function(model, loss, params)
    names = list(params)
    limit = HVP_REVERSE_MAX_ROWS if reverse_max_rows is None else int(reverse_max_rows)
    largest = (
        HVP_REVERSE_VECTORISED_MAX_PARAMETERS
        if vectorised_reverse_max_parameters is None
        else int(vectorised_reverse_max_parameters)
    )
    size = sum(t.numel() for t in params.values())
    vectorised_reverse = size <= largest
    reverse = create_batch_hvp_reverse_function(model, loss, params)
    gradient = grad(batch_loss)

    def reverse_vectorised(
        p: ParamDict, x: torch.Tensor, y: torch.Tensor, vs: torch.Tensor
    ) -> torch.Tensor:
        _, pullback = vjp(lambda q: gradient(q, x, y), p)  # type: ignore[misc]
        rows = vmap(pullback)(unflatten(vs, p))[0]
        return torch.cat([rows[n].reshape(vs.shape[0], -1) for n in names], 1)

    def forward_over_reverse(
        p: ParamDict, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        tangent = jvp(lambda q: gradient(q, x, y), (p,), (unflatten(v, p),))[1]
        return torch.cat([tangent[n].reshape(-1) for n in names])

    def reverse_over_forward(
        p: ParamDict, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        def directional(q: ParamDict) -> torch.Tensor:
            return jvp(lambda r: batch_loss(r, x, y), (q,), (unflatten(v, q),))[1]

        g = grad(directional)(p)
        return torch.cat([g[n].reshape(-1) for n in names])

    vectorised = {
        function: vmap(function, in_dims=(None, None, None, 0))
        for function in (forward_over_reverse, reverse_over_forward)
    }
    strategy = [forward_over_reverse]

    def batched(p: ParamDict, x: torch.Tensor, y: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        try:
            return vectorised[strategy[0]](p, x, y, vs)  # type: ignore[no-any-return]
        except RuntimeError as error:
            if strategy[0] is reverse_over_forward or "ZeroTensor" not in str(error):
                raise
            logger.debug("Forward-over-reverse failed (%s): using reverse-over-forward.", error)
            strategy[0] = reverse_over_forward
            return vectorised[reverse_over_forward](p, x, y, vs)  # type: ignore[no-any-return]

    serialised = ForwardModeSerialised(batched)

    def hvp(p: ParamDict, x: torch.Tensor, y: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        if vs.shape[0] <= limit or vs.shape[0] >= size:
            return reverse(p, x, y, vs)
        if vectorised_reverse:
            return reverse_vectorised(p, x, y, vs)
        return serialised(p, x, y, vs)  # type: ignore[no-any-return]

    return hvp


HESSIAN_CHUNK_BUDGET = 2**17
"""Default number of (Hessian column, sample) pairs processed at once by
[hessian][influx.torch.functional.hessian]: enough to keep vectorised kernels busy, few
enough for the intermediate activations (one copy per pair) to stay small."""


def create_batch_hessian_function(
    model: torch.nn.Module, loss: LossFunction, params: ParamDict
) -> Callable[[ParamDict, torch.Tensor, torch.Tensor, Optional[int]], torch.Tensor]:
    r"""$(\theta, x, y, c) \mapsto \nabla^2_\theta L(\theta)$, the dense Hessian `(P, P)` of the
    batch loss, $c$ columns at a time (None: the default chunk size of
    [hessian][influx.torch.functional.hessian]).

    Reverse-over-reverse: one forward pass and one backward pass that records its graph give
    the gradient map $g(\theta) = \nabla_\theta L(\theta)$ and its vector-Jacobian product
    $u \mapsto \nabla_\theta (g(\theta)^\top u) = H u$; the columns of the identity are then
    pushed through that product $c$ at a time, vectorised with `vmap`. The forward pass and
    the first backward pass are shared by all $P$ columns, and only reverse-mode derivatives
    are used (several threads may run it at once). The transformed functions are built here,
    once.
    """
    batch_loss = create_batch_loss_function(model, loss, params)
    names = list(params)
    gradient = grad(batch_loss)

    def dense(
        p: ParamDict, x: torch.Tensor, y: torch.Tensor, chunk_size: Optional[int] = None
    ) -> torch.Tensor:
        size = sum(t.numel() for t in p.values())
        first = next(iter(p.values()))
        if chunk_size is None:
            chunk_size = max(1, HESSIAN_CHUNK_BUDGET // max(1, int(x.shape[0])))
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

    return dense


def hessian(
    model: torch.nn.Module,
    loss: LossFunction,
    params: ParamDict,
    x: torch.Tensor,
    y: torch.Tensor,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    r"""The Hessian $\nabla^2_\theta L(\theta)$ of the batch loss, shape `(P, P)`.

    Built from Hessian-vector products with the columns of the identity, `chunk_size`
    columns at a time, reverse-over-reverse (see
    [create_batch_hessian_function][influx.torch.functional.create_batch_hessian_function]).
    The cost is one forward pass, one backward pass and $P$ second backward passes whatever
    the chunk size; the chunk size bounds the intermediate activations, which are those of a
    batch of `chunk_size` times $N$ samples. The default takes
    $\max(1, \lfloor 2^{17} / N \rfloor)$ columns for a batch of $N$ samples.
    """
    return create_batch_hessian_function(model, loss, params)(params, x, y, chunk_size)


def gauss_newton(per_sample_grads: torch.Tensor) -> torch.Tensor:
    r"""$\frac{1}{n} G^\top G$ for the per-sample gradient matrix $G$ `(n, P)`."""
    return per_sample_grads.T @ per_sample_grads / per_sample_grads.shape[0]


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


# The low-rank representations and sketches live in their own module (kept importable here).
from .functional_low_rank import (  # noqa: E402
    LowRankProductRepresentation,
    nystroem_sketch,
    randomized_nystroem_approximation,
)
