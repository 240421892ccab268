r"""What one batch contributes to a curvature operator.

A batch operation $B_b$ maps a batch $b$ and a matrix of row vectors $V$ `(K, P)` to
$V B_b^\top$. The operators in [influx.torch.operator][influx.torch.operator] average these
over a data loader, weighting each batch by its number of points.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Dict, Iterable, List, Optional, Tuple, TypeVar, Union

import torch

from .base import TorchBatch
from .functional import (
    LossFunction,
    create_batch_hvp_function,
    create_per_sample_gradient_function,
    flatten_dimensions,
    gauss_newton,
    get_model_parameters,
    hessian,
    operator_to_dense,
)

__all__ = [
    "BatchOperation",
    "BatchOperationType",
    "ChunkAveraging",
    "HessianBatchOperation",
    "GaussNewtonBatchOperation",
    "PointAveraging",
    "TensorAveragingType",
]


class BatchOperation(ABC):
    """A linear map defined by one batch of data, on the model's (restricted) parameters.

    Args:
        model: the model.
        restrict_to: the parameters the operation acts on; None means all trainable ones.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        self.model = model
        if restrict_to is None:
            self.params = get_model_parameters(model)
        else:
            self.params = {k: p.detach() for k, p in restrict_to.items()}

    @property
    def input_size(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def input_dict_structure(self) -> Dict[str, Tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self.params.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @abstractmethod
    def _build_functions(self) -> None:
        """(Re)build the functions of the parameters, e.g. after moving them."""

    def to(self, device: Union[torch.device, str]) -> "BatchOperation":
        """Move the model and the parameters to `device`; return self."""
        self.model.to(device)
        self.params = {name: p.to(device) for name, p in self.params.items()}
        self._build_functions()
        return self

    def apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        """Apply the batch's operator to a vector `(P,)` or the rows of a matrix `(K, P)`."""
        batch = batch.to(self.device)
        tensor = tensor.to(self.device)
        if tensor.ndim == 1:
            return self._apply(batch, tensor.unsqueeze(0)).squeeze(0)
        return self._apply(batch, tensor)

    def apply_to_dict(
        self, batch: TorchBatch, mat: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Apply the batch's operator to a dict of tensors by parameter name.

        The entries have the shapes of `input_dict_structure`, optionally with a leading batch
        dimension shared by all of them; the result has the same keys and shapes.

        Raises:
            ValueError: for other keys or shapes.
        """
        structure = self.input_dict_structure
        if not isinstance(mat, dict) or list(mat) != list(structure):
            given = list(mat) if isinstance(mat, dict) else type(mat).__name__
            raise ValueError(
                f"Parameter 'mat' must be a dict with keys {list(structure)}, got {given}."
            )
        unbatched = all(tuple(mat[k].shape) == shape for k, shape in structure.items())
        rows = {k: v.unsqueeze(0) for k, v in mat.items()} if unbatched else mat
        leading = {v.shape[0] for v in rows.values()}
        bad = [k for k, shape in structure.items() if tuple(rows[k].shape[1:]) != shape]
        if bad or len(leading) != 1:
            raise ValueError(
                f"Parameter 'mat' must have the shapes {structure}, each with or without a "
                f"common leading batch dimension, got "
                f"{ {k: tuple(v.shape) for k, v in mat.items()} }."
            )
        n = leading.pop()
        flat = torch.cat([v.reshape(n, -1) for v in rows.values()], dim=1)
        result = self.apply(batch, flat)
        sizes = [math.prod(shape) for shape in structure.values()]
        pieces = torch.split(result, sizes, dim=1)
        out = {k: piece.reshape(n, *shape) for (k, shape), piece in zip(structure.items(), pieces)}
        return {k: v.squeeze(0) for k, v in out.items()} if unbatched else out

    def _apply_to_mat(self, batch: TorchBatch, mat: torch.Tensor) -> torch.Tensor:
        """Apply to the rows of a 2-D tensor `(K, P)`."""
        return self._apply(batch, mat)

    @abstractmethod
    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        """Apply to the rows of a 2-D tensor."""

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        """The matrix `(P, P)` of the batch's operator."""
        return operator_to_dense(
            lambda t: self._apply(batch, t), self.input_size, self.dtype, self.device
        )


class HessianBatchOperation(BatchOperation):
    r"""$V \mapsto V \nabla^2_\theta L_b(\theta)$ with $L_b = \text{loss}(f_\theta(x_b), y_b)$.

    Hessian-vector products are computed forward-over-reverse, all rows at once.

    Args:
        model: the model.
        loss: the loss function, mean over the batch.
        restrict_to: the parameters; the operator is the corresponding sub-matrix.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(model, restrict_to)
        self.loss = loss
        self._build_functions()

    def _build_functions(self) -> None:
        self._hvp = create_batch_hvp_function(self.model, self.loss, self.params)

    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        return self._hvp(self.params, batch.x, batch.y, tensor)  # type: ignore[no-any-return]

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        return hessian(self.model, self.loss, self.params, batch.x, batch.y)


class GaussNewtonBatchOperation(BatchOperation):
    r"""$V \mapsto V G_b$ with the Gauss-Newton (empirical Fisher) matrix of the batch

    $$G_b = \frac{1}{|b|}\sum_{i \in b} \nabla_\theta \ell_i \nabla_\theta \ell_i^\top .$$

    Args:
        model: the model.
        loss: the loss function.
        restrict_to: the parameters; the operator is the corresponding sub-matrix.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(model, restrict_to)
        self.loss = loss
        self._build_functions()

    def _build_functions(self) -> None:
        self._grads = create_per_sample_gradient_function(self.model, self.loss, self.params)

    def per_sample_grads(self, batch: TorchBatch) -> torch.Tensor:
        """The per-sample gradients of the batch, shape `(|b|, P)`."""
        grads = self._grads(self.params, batch.x, batch.y)
        return flatten_dimensions(grads.values(), shape=(len(batch), -1))

    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        return self._rank_one_mvp(self.per_sample_grads(batch), tensor)

    @staticmethod
    def _rank_one_mvp(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""$\frac{1}{N}\sum_i x_i x_i^\top v_k$ for the rows $x_i$ of `x` `(N, P)` and $v_k$
        of `v` `(K, P)`, shape `(K, P)`."""
        return (v @ x.T) @ x / x.shape[0]

    @staticmethod
    def _generate_rank_one_mvp(
        x: Iterable[torch.Tensor], v: Iterable[torch.Tensor]
    ) -> List[torch.Tensor]:
        """[_rank_one_mvp][influx.torch.batch_operation.GaussNewtonBatchOperation._rank_one_mvp]
        for vectors given in pieces (one tensor per parameter, leading dimensions `N` and
        `K`), returned in the same pieces."""
        xs, vs = list(x), list(v)
        n = xs[0].shape[0]
        products = [vi.reshape(vi.shape[0], -1) @ xi.reshape(n, -1).T for xi, vi in zip(xs, vs)]
        coefficients = torch.stack(products).sum(dim=0) / n
        return [(coefficients @ xi.reshape(n, -1)).reshape(vi.shape) for xi, vi in zip(xs, vs)]

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        return gauss_newton(self.per_sample_grads(batch))


BatchOperationType = TypeVar("BatchOperationType", bound=BatchOperation)


class _Averaging(ABC):
    """Averages a stream of tensors (e.g. per-batch results) into one tensor."""

    @abstractmethod
    def _weight(self, tensor: torch.Tensor) -> float:
        """The weight of one tensor of the stream."""

    def __call__(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        weight = 0.0
        for tensor in tensors:
            w = self._weight(tensor)
            total = tensor * w if total is None else total + tensor * w
            weight += w
        if total is None:
            raise ValueError("Parameter 'tensors' yielded nothing to average.")
        return total / weight

    def as_dict_averaging(
        self,
    ) -> Callable[[Iterable[Dict[str, torch.Tensor]]], Dict[str, torch.Tensor]]:
        """The same averaging for a stream of dicts of tensors (weighted by their first
        entry), applied key by key."""

        def average(tensor_dicts: Iterable[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
            total: Optional[Dict[str, torch.Tensor]] = None
            weight = 0.0
            for tensor_dict in tensor_dicts:
                w = self._weight(next(iter(tensor_dict.values())))
                if total is None:
                    total = {k: t * w for k, t in tensor_dict.items()}
                else:
                    total = {k: total[k] + t * w for k, t in tensor_dict.items()}
                weight += w
            if total is None:
                raise ValueError("Parameter 'tensor_dicts' yielded nothing to average.")
            return {k: t / weight for k, t in total.items()}

        return average


class ChunkAveraging(_Averaging):
    r"""The plain mean of a stream of tensors, $\frac{1}{m}\sum_{k=1}^m t_k$."""

    def _weight(self, tensor: torch.Tensor) -> float:
        return 1.0


class PointAveraging(_Averaging):
    r"""The mean of a stream of tensors weighted by their number of points,
    $\sum_k n_k t_k / \sum_k n_k$ with $n_k$ the size of $t_k$ along `batch_dim`.

    Args:
        batch_dim: the dimension whose size is the number of points of a tensor.
    """

    def __init__(self, batch_dim: int = 0):
        self.batch_dim = batch_dim

    def _weight(self, tensor: torch.Tensor) -> float:
        return float(tensor.shape[self.batch_dim])


TensorAveragingType = TypeVar("TensorAveragingType", bound=_Averaging)


def __getattr__(name: str) -> object:
    # InverseHarmonicMeanBatchOperation lives in influx.torch.inverse_harmonic_mean (which imports this module); it is also
    # reachable here, where the reference API places it.
    if name == "InverseHarmonicMeanBatchOperation":
        from .inverse_harmonic_mean import InverseHarmonicMeanBatchOperation

        return InverseHarmonicMeanBatchOperation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
