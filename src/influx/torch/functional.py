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
* Hessian-vector products $\nabla^2_\theta L \, v$ (forward-over-reverse),
* Gauss-Newton products $\frac{1}{n}\sum_i \nabla_\theta \ell_i \nabla_\theta \ell_i^\top v$.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Tuple,
    cast,
)

import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.utils import _pytree as pytree

from .model_call import (
    LossFunction,
    LossOrTask,
    TaskLike,
    call_model,
    is_task,
    model_outputs,
    perturbation_entry,
    task_objective,
)
from .per_sample import PerSampleGradients
from .structure_copy import StructureSignature, structure_signature, thread_structure_copy

logger = logging.getLogger(__name__)

__all__ = [
    "LossFunction",
    "LossOrTask",
    "TaskLike",
    "FunctionalModel",
    "PerSampleGradients",
    "call_model",
    "model_outputs",
    "is_task",
    "task_objective",
    "perturbation_entry",
    "flatten_dimensions",
    "functional_forward",
    "get_model_parameters",
    "create_batch_loss_function",
    "create_per_sample_loss_function",
    "create_per_sample_gradient_function",
    "create_per_sample_mixed_derivative_function",
    "create_matrix_jacobian_product_function",
    "create_batch_hvp_function",
    "hessian",
    "gauss_newton",
    "operator_to_dense",
    "LowRankProductRepresentation",
    "randomized_nystroem_approximation",
    "nystroem_sketch",
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


def functional_forward(
    model: torch.nn.Module,
    tensors: ParamDict,
    args: Tuple[Any, ...],
    signature: Optional[StructureSignature] = None,
    kwargs: Optional[Dict[str, Any]] = None,
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
        kwargs: the keyword arguments of the forward pass.
    """
    if signature is None:
        signature = structure_signature(model)
    return functional_call(thread_structure_copy(model, signature), tensors, args, kwargs)


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


class FunctionalModel:
    """A module evaluated with given parameters: calling it runs
    [functional_forward][influx.torch.functional.functional_forward] (positional and keyword
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
    model: torch.nn.Module, loss: LossOrTask, params: ParamDict, measurement: bool = False
) -> Callable[[ParamDict, Any, Any], torch.Tensor]:
    r"""$(\theta, x, y) \mapsto L(\theta)$, the loss of the batch as a function of `params`.

    Parameters of the model not in `params` (and buffers) are held fixed. `x` and `y` are
    tensors or structures of tensors; `loss` is a function `loss(outputs, y)` or a
    [Task][influx.torch.task.Task], whose `measurement` is used if `measurement` is True.
    """
    merge = _with_frozen(params, model)
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
    model: torch.nn.Module, loss: LossOrTask, params: ParamDict, measurement: bool = False
) -> Callable[[ParamDict, Any, Any], torch.Tensor]:
    r"""$(\theta, x, y) \mapsto (\ell_i(\theta))_i$, vectorised over the batch."""
    single = _create_single_sample_loss_function(model, loss, params, measurement)
    return vmap(single, in_dims=(None, 0, 0))  # type: ignore[no-any-return]


def create_per_sample_gradient_function(
    model: torch.nn.Module, loss: LossOrTask, params: ParamDict, measurement: bool = False
) -> Callable[[ParamDict, Any, Any], ParamDict]:
    r"""$(\theta, x, y) \mapsto \{\text{name}: (\nabla_\theta \ell_i)_i\}$, shapes `(N, *p.shape)`.

    Vectorised with `vmap` (see [PerSampleGradients][influx.torch.per_sample.PerSampleGradients]
    for models that branch on their inputs). With `measurement`, the gradients of the task's
    measurement.
    """
    single = _create_single_sample_loss_function(model, loss, params, measurement)
    if is_task(loss):
        return PerSampleGradients(single, model_name=type(model).__name__)
    merge = _with_frozen(params, model)
    signature = structure_signature(model)

    def outputs(p: ParamDict, x: Any) -> Any:
        return model_outputs(call_model(FunctionalModel(model, merge(p), signature), x))

    return PerSampleGradients(single, outputs, cast(LossFunction, loss), type(model).__name__)


def create_per_sample_mixed_derivative_function(
    model: torch.nn.Module, loss: LossOrTask, params: ParamDict, measurement: bool = False
) -> Callable[[ParamDict, Any, Any], ParamDict]:
    r"""$(\theta, x, y) \mapsto \{\text{name}: (\nabla_x \nabla_\theta \ell_i)_i\}$.

    Reverse-over-forward: for each input feature $f$ the directional derivative
    $\partial_{x_f} \ell_i$ is a Jacobian-vector product, and its gradient with respect to
    $\theta$ is one backward pass; both are vectorised over features and samples. Each value
    has shape `(N, F, *p.shape)` with $F$ the number of input features. For structured inputs
    the derivative is taken with respect to one tensor of `x` (see
    [perturbation_entry][influx.torch.functional.perturbation_entry]), the others held fixed.
    """
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
        entry = flat[index]

        def per_sample(pp: ParamDict, e: torch.Tensor, others: List[Any], yy: Any) -> ParamDict:
            return one_sample(pp, e, others, spec, index, yy)

        return vmap(per_sample, in_dims=(None, 0, 0, 0))(p, entry, flat, y)  # type: ignore[no-any-return]

    return ForwardModeSerialised(mixed)


def create_matrix_jacobian_product_function(
    model: torch.nn.Module, loss: LossOrTask, params: ParamDict, measurement: bool = False
) -> Callable[[ParamDict, Any, Any, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y, g) \mapsto (\nabla_\theta \ell_i \cdot g_k)_{ik}$, shape `(N, K)`.

    Uses forward-mode derivatives (one Jacobian-vector product per row of `g`, `(K, P)`),
    so the `(N, P)` matrix of per-sample gradients is never formed.
    """
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


def create_batch_hvp_function(
    model: torch.nn.Module, loss: LossOrTask, params: ParamDict
) -> Callable[[ParamDict, Any, Any, torch.Tensor], torch.Tensor]:
    r"""$(\theta, x, y, V) \mapsto V \nabla^2_\theta L(\theta)$ for the rows of `V` `(K, P)`.

    Forward-over-reverse: $H v = \frac{d}{dt} \nabla_\theta L(\theta + t v)\big|_{t=0}$, a
    Jacobian-vector product of the gradient map, vectorised over the rows of `V`; the
    backward pass depends on the primal values only, so the rows of `V` batch into plain
    matrix products. Where torch's forward-mode rules fail for the loss (e.g. `mse_loss` in
    some torch versions), it falls back to reverse-over-forward,
    $H v = \nabla_\theta (\nabla_\theta L \cdot v)$, with the same result. The Hessian is
    never formed.
    """
    batch_loss = create_batch_loss_function(model, loss, params)
    names = list(params)

    def forward_over_reverse(p: ParamDict, x: Any, y: Any, v: torch.Tensor) -> torch.Tensor:
        def gradient(q: ParamDict) -> ParamDict:
            return grad(batch_loss)(q, x, y)  # type: ignore[no-any-return]

        tangent = jvp(gradient, (p,), (unflatten(v, p),))[1]
        return torch.cat([tangent[n].reshape(-1) for n in names])

    def reverse_over_forward(p: ParamDict, x: Any, y: Any, v: torch.Tensor) -> torch.Tensor:
        def directional(q: ParamDict) -> torch.Tensor:
            return jvp(lambda r: batch_loss(r, x, y), (q,), (unflatten(v, q),))[1]

        g = grad(directional)(p)
        return torch.cat([g[n].reshape(-1) for n in names])

    strategy = [forward_over_reverse]

    def hvp(p: ParamDict, x: Any, y: Any, vs: torch.Tensor) -> torch.Tensor:
        try:
            return vmap(strategy[0], in_dims=(None, None, None, 0))(p, x, y, vs)  # type: ignore[no-any-return]
        except RuntimeError as error:
            if strategy[0] is reverse_over_forward or "ZeroTensor" not in str(error):
                raise
            logger.debug("Forward-over-reverse failed (%s): using reverse-over-forward.", error)
            strategy[0] = reverse_over_forward
            return vmap(reverse_over_forward, in_dims=(None, None, None, 0))(p, x, y, vs)  # type: ignore[no-any-return]

    return ForwardModeSerialised(hvp)


HESSIAN_CHUNK_BUDGET = 2**17
"""Default number of (Hessian column, sample) pairs processed at once by
[hessian][influx.torch.functional.hessian]: enough to keep vectorised kernels busy, few
enough for the intermediate activations (one copy per pair) to stay small."""


def hessian(
    model: torch.nn.Module,
    loss: LossOrTask,
    params: ParamDict,
    x: Any,
    y: Any,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    r"""The Hessian $\nabla^2_\theta L(\theta)$ of the batch loss, shape `(P, P)`.

    Built from Hessian-vector products with the columns of the identity, `chunk_size`
    columns at a time. The cost is that of $P$ Hessian-vector products whatever the chunk
    size; the chunk size bounds the intermediate activations, which are those of a batch of
    `chunk_size` times $N$ samples. The default takes $\max(1, \lfloor 2^{17} / N \rfloor)$
    columns for a batch of $N$ samples.
    """
    size = sum(p.numel() for p in params.values())
    hvp = create_batch_hvp_function(model, loss, params)
    first = next(iter(params.values()))
    if chunk_size is None:
        n = int(pytree.tree_leaves(x)[0].shape[0])
        chunk_size = max(1, HESSIAN_CHUNK_BUDGET // max(1, n))
    step = min(size, chunk_size)
    result = torch.empty(size, size, dtype=first.dtype, device=first.device)
    for start in range(0, size, step):
        stop = min(size, start + step)
        basis = torch.zeros(stop - start, size, dtype=first.dtype, device=first.device)
        basis[:, start:stop].fill_diagonal_(1.0)
        result[start:stop] = hvp(params, x, y, basis)
    return result


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


class LowRankProductRepresentation:
    r"""A symmetric low-rank matrix $A = V D V^\top$.

    Args:
        eigen_vals: the diagonal of $D$, shape `(r,)`.
        projections: the columns of $V$, shape `(P, r)`, orthonormal.
    """

    def __init__(self, eigen_vals: torch.Tensor, projections: torch.Tensor):
        if eigen_vals.ndim != 1 or projections.ndim != 2:
            raise ValueError(
                "Parameters 'eigen_vals' and 'projections' must have shapes (r,) and (P, r), "
                f"got {tuple(eigen_vals.shape)} and {tuple(projections.shape)}."
            )
        if projections.shape[1] != eigen_vals.shape[0]:
            raise ValueError(
                f"Parameter 'projections' must have {eigen_vals.shape[0]} columns (one per "
                f"eigenvalue), got shape {tuple(projections.shape)}."
            )
        self.eigen_vals = eigen_vals
        self.projections = projections

    @property
    def device(self) -> torch.device:
        return self.projections.device

    def to(self, device: torch.device) -> "LowRankProductRepresentation":
        """A copy on `device` (the representation itself is unchanged)."""
        return LowRankProductRepresentation(self.eigen_vals.to(device), self.projections.to(device))


def randomized_nystroem_approximation(
    mat_mat_prod: Callable[[torch.Tensor], torch.Tensor],
    input_dim: int,
    rank: int,
    input_type: torch.dtype,
    mat_vec_device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> LowRankProductRepresentation:
    r"""Randomized Nyström approximation $A \approx V D V^\top$ of a positive semi-definite $A$.

    With a Gaussian test matrix orthonormalised to $Q$ `(P, r)` and $Y = AQ$, the Nyström
    approximation is $A_{\text{nys}} = Y (Q^\top Y)^{+} Y^\top$. A small shift
    $\nu = \sqrt{P}\,\epsilon\,\|Y\|$ keeps the Cholesky factorisation of $Q^\top Y$ stable
    and is removed from the eigenvalues afterwards. At $r = P$ the approximation is exact; for
    a matrix of rank at most $r$ it is exact almost surely.

    If $Q^\top A Q$ is not positive definite, $A$ has negative curvature along the sketch:
    a warning is logged and only the positive part of $Q^\top A Q$ is used (the result then
    approximates neither $A$ nor its positive part exactly).

    Args:
        mat_mat_prod: $X \mapsto A X$ for a matrix $X$ `(P, k)`.
        input_dim: $P$.
        rank: $r$, the number of eigenpairs.
        input_type: dtype of the test matrix.
        mat_vec_device: device of the test matrix.
        generator: optional random generator, for reproducibility.

    Returns:
        The eigenvalues (descending, non-negative) and orthonormal eigenvectors; fewer than
        `rank` of them if negative curvature was found.
    """
    representation, _ = nystroem_sketch(
        mat_mat_prod, input_dim, rank, input_type, mat_vec_device, generator
    )
    return representation


def nystroem_sketch(
    mat_mat_prod: Callable[[torch.Tensor], torch.Tensor],
    input_dim: int,
    rank: int,
    input_type: torch.dtype,
    mat_vec_device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[LowRankProductRepresentation, float]:
    """[randomized_nystroem_approximation][influx.torch.functional.randomized_nystroem_approximation],
    also returning the smallest eigenvalue of $Q^\top A Q$ (negative: negative curvature
    was detected along the sketch)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"Parameter 'rank' must be an int, got {type(rank).__name__}.")
    if not 0 < rank <= input_dim:
        raise ValueError(f"Parameter 'rank' must be in [1, {input_dim}], got {rank}.")
    omega = torch.randn(
        input_dim, rank, dtype=input_type, device=mat_vec_device, generator=generator
    )
    q, _ = torch.linalg.qr(omega)
    y = mat_mat_prod(q)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(
            "The operator returned NaN or Inf in the Nyström sketch: check the model, the loss "
            "and the data."
        )
    shift = math.sqrt(input_dim) * torch.finfo(y.dtype).eps * torch.linalg.norm(y)
    y_shifted = y + shift * q
    core = q.T @ y_shifted
    core = (core + core.T) / 2
    chol, info = torch.linalg.cholesky_ex(core)
    if int(info) == 0:
        smallest = float(torch.linalg.eigvalsh(core)[0] - shift)
        b = torch.linalg.solve_triangular(chol, y_shifted.T, upper=False).T
    else:
        evals, evecs = torch.linalg.eigh(core)
        smallest = float(evals[0] - shift)
        keep = evals > shift
        logger.warning(
            "Nyström sketch: the matrix has negative curvature along the sketch (smallest "
            "eigenvalue of Q^T A Q: %.3g, %d of %d directions dropped). The approximation "
            "assumes a positive semi-definite matrix; use the Gauss-Newton matrix or a convex "
            "model.",
            smallest,
            int((~keep).sum()),
            rank,
        )
        b = y_shifted @ evecs[:, keep] / torch.sqrt(evals[keep])
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    eigen_vals = torch.clamp(sigma**2 - shift, min=0.0)
    return LowRankProductRepresentation(eigen_vals, u), smallest
