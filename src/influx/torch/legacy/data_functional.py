r"""Functional helpers over a whole data loader or an operator.

For a model $f_\theta$, a loss $\ell$ and a data loader of $n$ points in batches $b$, the
mean loss is

$$
L(\theta) = \frac{1}{n} \sum_b |b|\, L_b(\theta), \qquad
L_b(\theta) = \text{loss}(f_\theta(x_b), y_b),
$$

every batch weighted by its number of points, so that the result does not depend on how the
data is batched. Here are its Hessian-vector products, its Hessian and the Gauss-Newton matrix
over the loader, and low-rank approximations of any
[TensorOperator][influx.torch.curvature.tensor_operator.TensorOperator]. All are also reachable from
[influx.torch.functional][influx.torch.functional].
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch

from ..autodiff.derivatives import (
    LossFunction,
    create_batch_loss_function,
    create_per_sample_gradient_function,
    flatten_dimensions,
    get_model_parameters,
    model_device,
)
from ..autodiff.hessian_products import batch_hessian, create_batch_hvp_function
from ..data.batches import loader_items
from ..inverse.sketch import (
    LowRankProductRepresentation,
    ShiftFunction,
    randomized_nystroem_approximation,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..curvature.tensor_operator import TensorOperator

__all__ = [
    "gauss_newton",
    "hessian",
    "create_empirical_loss_function",
    "create_hvp_function",
    "data_gauss_newton",
    "data_hessian",
    "operator_nystroem_approximation",
    "operator_spectral_approximation",
]

logger = logging.getLogger(__name__)

ParamDict = Dict[str, torch.Tensor]


def _pairs(
    data_loader: Iterable, device: torch.device
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    for index, batch in enumerate(loader_items(data_loader)):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"Parameter 'data_loader' must yield pairs (x, y) of tensors; batch {index} is "
                f"a {type(batch).__name__}."
            )
        yield batch[0].to(device), batch[1].to(device)


def _weighted_mean(
    data_loader: Iterable,
    device: torch.device,
    per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """$\\frac{1}{n}\\sum_b |b|\\, g(x_b, y_b)$ over the loader."""
    total: Optional[torch.Tensor] = None
    count = 0
    for x, y in _pairs(data_loader, device):
        value = per_batch(x, y) * x.shape[0]
        total = value if total is None else total + value
        count += x.shape[0]
    if total is None:
        raise ValueError("Parameter 'data_loader' yielded no batches.")
    return total / count


def create_empirical_loss_function(
    model: torch.nn.Module, loss: LossFunction, data_loader: Iterable
) -> Callable[[ParamDict], torch.Tensor]:
    r"""$\theta \mapsto L(\theta)$, the mean loss over all points of the loader.

    Each call iterates over the loader; parameters of the model not in the dict it is called
    with (and buffers) are the model's own.

    Args:
        model: the model.
        loss: the loss function (mean reduction).
        data_loader: an iterable of `(x, y)` batches.
    """

    def empirical_loss(params: ParamDict) -> torch.Tensor:
        device = model_device(model)
        batch_loss = create_batch_loss_function(model, loss, params)
        return _weighted_mean(data_loader, device, lambda x, y: batch_loss(params, x, y))

    return empirical_loss


def create_hvp_function(
    model: torch.nn.Module,
    loss: LossFunction,
    data_loader: Iterable,
    precompute_grad: bool = True,
    use_average: bool = True,
    reverse_only: bool = True,
    track_gradients: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""$v \mapsto \nabla^2_\theta L(\theta)\, v$ for the mean loss over the loader, with
    respect to all trainable parameters of the model.

    The returned function takes a vector `(P,)` or a matrix `(K, P)` (one product per row)
    and returns the same shape. Each call makes one pass over the loader, accumulating the
    batch products weighted by the batch sizes.

    Args:
        model: the model.
        loss: the loss function (mean reduction).
        data_loader: an iterable of `(x, y)` batches.
        precompute_grad: accepted for compatibility: the reference API precomputes the
            gradient for a double-backward product; here the products are always computed
            batch by batch, without keeping a graph between calls.
        use_average: accepted for compatibility: the reference API either averages batch
            products or differentiates the whole empirical loss, which is the same operator;
            batches are always weighted by their size here.
        reverse_only: reverse-over-reverse products (True) or forward-over-reverse with a
            fallback to reverse mode (False).
        track_gradients: keep the result differentiable with respect to the parameters.
    """
    del precompute_grad, use_average
    params = get_model_parameters(model, detach=not track_gradients)
    batch_hvp = create_batch_hvp_function(model, loss, params=params, reverse_only=reverse_only)

    def hvp_function(vec: torch.Tensor) -> torch.Tensor:
        device = model_device(model)
        rows = vec.to(device).reshape(-1, vec.shape[-1])
        result = _weighted_mean(data_loader, device, lambda x, y: batch_hvp(params, x, y, rows))
        return result.reshape(vec.shape)

    return hvp_function


def data_hessian(
    model: torch.nn.Module,
    loss: LossFunction,
    data_loader: Iterable,
    track_gradients: bool = False,
    restrict_to: Optional[ParamDict] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    r"""$\frac{1}{n}\sum_b |b|\, \nabla^2_\theta L_b(\theta)$, the Hessian of the mean loss over
    the loader, shape `(P, P)`, with respect to `restrict_to` (default: all trainable
    parameters); see [hessian][influx.torch.legacy.data_functional.hessian]."""
    params = (
        get_model_parameters(model, detach=not track_gradients)
        if restrict_to is None
        else dict(restrict_to)
    )
    if not track_gradients:
        params = {name: p.detach() for name, p in params.items()}
    device = model_device(model)
    result = _weighted_mean(
        data_loader,
        device,
        lambda x, y: batch_hessian(model, loss, params, x, y, chunk_size),
    )
    return result if track_gradients else result.detach()


def data_gauss_newton(
    model: torch.nn.Module,
    loss: LossFunction,
    data_loader: Iterable,
    restrict_to: Optional[ParamDict] = None,
) -> torch.Tensor:
    r"""$\frac{1}{n}\sum_{i=1}^n \nabla_\theta \ell_i \nabla_\theta \ell_i^\top$ over the
    loader, shape `(P, P)`, with respect to `restrict_to` (default: all trainable
    parameters); see [gauss_newton][influx.torch.legacy.data_functional.gauss_newton]."""
    params = (
        get_model_parameters(model)
        if restrict_to is None
        else {name: p.detach() for name, p in restrict_to.items()}
    )
    per_sample = create_per_sample_gradient_function(model, loss, params)

    def batch_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grads = flatten_dimensions(per_sample(params, x, y).values(), shape=(x.shape[0], -1))
        return grads.T @ grads / x.shape[0]

    return _weighted_mean(data_loader, model_device(model), batch_matrix)


def operator_nystroem_approximation(
    operator: "TensorOperator",
    rank: int,
    shift_func: Optional[ShiftFunction] = None,
) -> LowRankProductRepresentation:
    r"""Randomized Nyström approximation $A \approx V D V^\top$ of a positive semi-definite
    operator, from one application of $A$ to `rank` vectors; see
    [randomized_nystroem_approximation][influx.torch.inverse.sketch.randomized_nystroem_approximation].

    Args:
        operator: a symmetric positive semi-definite
            [TensorOperator][influx.torch.curvature.tensor_operator.TensorOperator].
        rank: the sketch size (clipped to the operator's size with a warning).
        shift_func: $Y \mapsto \nu$, the stabilising shift of the sketch.
    """
    return randomized_nystroem_approximation(
        lambda x: operator.apply(x.T).T,
        operator.input_size,
        rank,
        operator.dtype,
        shift_func=shift_func,
        mat_vec_device=operator.device,
    )


def operator_spectral_approximation(
    operator: "TensorOperator",
    rank: int = 10,
    krylov_dimension: Optional[int] = None,
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    eigen_computation_on_gpu: bool = False,
) -> LowRankProductRepresentation:
    r"""The `rank` eigenpairs of largest magnitude of a symmetric operator, $A \approx V D
    V^\top$, by the thick-restart Lanczos method in torch on the operator's device; see
    [lanczos_eigenpairs][influx.torch.inverse.low_rank_approximation.lanczos_eigenpairs].

    A `rank` larger than the operator's size is clipped to it with a logged warning.

    Args:
        operator: a symmetric [TensorOperator][influx.torch.curvature.tensor_operator.TensorOperator].
        rank: the number of eigenpairs.
        krylov_dimension: the size of the Lanczos basis (None: $\min(P, \max(2r + 1, 20))$);
            capped at $P$.
        tol: relative tolerance on the eigen-residuals.
        max_iter: the maximum number of restarts (None: $10 P$).
        eigen_computation_on_gpu: accepted for compatibility and ignored: the computation
            always runs in torch on the operator's device (a GPU if the operator is on one).
    """
    from ..inverse.low_rank_approximation import (
        default_krylov_dimension,
        lanczos_low_rank,
        validate_rank,
    )

    del eigen_computation_on_gpu
    size = operator.input_size
    rank = validate_rank(rank, size)
    krylov: Union[int, None] = (
        default_krylov_dimension(rank, size)
        if krylov_dimension is None
        else min(max(krylov_dimension, rank + 1), size)
    )
    return lanczos_low_rank(operator, rank, krylov, tol, max_iter).representation


def hessian(
    model: torch.nn.Module,
    loss: LossFunction,
    data_loader: Union[Iterable, ParamDict],
    use_hessian_avg: Union[bool, torch.Tensor] = True,
    track_gradients: Union[bool, torch.Tensor] = False,
    restrict_to: Optional[ParamDict] = None,
    *,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    r"""The Hessian of the mean loss, shape `(P, P)`, over a data loader or over one batch.

    Two forms:

    * `hessian(model, loss, data_loader, use_hessian_avg=True, track_gradients=False,
      restrict_to=None)` (the reference API's form): the Hessian of the mean loss over all
      $n$ points of the loader, $\frac{1}{n}\sum_b |b|\, \nabla^2_\theta L_b(\theta)$ with
      respect to `restrict_to` (default: all trainable parameters). `use_hessian_avg` chooses
      between averaging per-batch Hessians and differentiating the whole empirical loss in
      the reference API; both are the same matrix and are computed the same way here.
      `track_gradients=True` keeps the result differentiable with respect to the parameters.
    * `hessian(model, loss, params, x, y, chunk_size=None)`: the Hessian of the loss of the
      batch `(x, y)` with respect to `params`.

    The matrix is built from Hessian-vector products with the columns of the identity,
    `chunk_size` columns at a time. The cost is that of $P$ products whatever the chunk size;
    the chunk size bounds the intermediate activations, which are those of a batch of
    `chunk_size` times $N$ samples. The default takes $\max(1, \lfloor 2^{17} / N \rfloor)$
    columns for a batch of $N$ samples.
    """
    if not isinstance(data_loader, Mapping):
        return data_hessian(
            model,
            loss,
            data_loader,
            track_gradients=bool(track_gradients),
            restrict_to=restrict_to,
            chunk_size=chunk_size,
        )
    if not isinstance(use_hessian_avg, torch.Tensor) or not isinstance(
        track_gradients, torch.Tensor
    ):
        raise TypeError(
            "hessian(model, loss, params, x, y): parameters 'x' and 'y' must be tensors, got "
            f"{type(use_hessian_avg).__name__} and {type(track_gradients).__name__}."
        )
    return batch_hessian(
        model, loss, dict(data_loader), use_hessian_avg, track_gradients, chunk_size
    )


def gauss_newton(
    model: Union[torch.nn.Module, torch.Tensor],
    loss: Optional[LossFunction] = None,
    data_loader: Optional[Iterable] = None,
    restrict_to: Optional[ParamDict] = None,
) -> torch.Tensor:
    r"""The Gauss-Newton matrix (empirical Fisher) $\frac{1}{n}\sum_{i=1}^n \nabla_\theta
    \ell_i \nabla_\theta \ell_i^\top$, shape `(P, P)`.

    Two forms:

    * `gauss_newton(model, loss, data_loader, restrict_to=None)` (the reference API's form):
      over all $n$ points of the loader, with respect to `restrict_to` (default: all
      trainable parameters), accumulated batch by batch;
    * `gauss_newton(per_sample_grads)`: $\frac{1}{n} G^\top G$ for a matrix $G$ `(n, P)` of
      per-sample gradients.

    Raises:
        TypeError: for a model without a loss and a data loader.
    """
    if isinstance(model, torch.Tensor):
        return model.T @ model / model.shape[0]
    if loss is None or data_loader is None:
        raise TypeError(
            "gauss_newton(model, loss, data_loader): parameters 'loss' and 'data_loader' are "
            "required with a model."
        )
    return data_gauss_newton(model, loss, data_loader, restrict_to)
