r"""What one batch contributes to a curvature operator.

A batch operation $B_b$ maps a batch $b$ and a matrix of row vectors $V$ `(K, P)` to
$V B_b^\top$. The operators in [influx.torch.operator][influx.torch.operator] average these
over a data loader, weighting each batch by its number of points.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Dict, Iterable, List, Optional, Tuple, TypeVar

import torch

from ..autodiff.derivatives import (
    LossOrTask,
    create_per_sample_gradient_function,
    flatten_dimensions,
    get_model_parameters,
    operator_to_dense,
)
from ..autodiff.hessian_products import batch_hessian, create_batch_hvp_function
from ..data.batches import TorchBatch
from ..data.state import OperatorState, StateContext, Stateful
from ..data.validation import validate_regularization
from .averaging import ChunkAveraging, PointAveraging, TensorAveragingType

__all__ = [
    "BatchOperation",
    "BatchOperationType",
    "ChunkAveraging",
    "PointAveraging",
    "TensorAveragingType",
    "LossBatchOperation",
    "HessianBatchOperation",
    "GaussNewtonBatchOperation",
    "InverseHarmonicMeanBatchOperation",
]


class BatchOperation(Stateful, ABC):
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

    def to(self, device: torch.device) -> "BatchOperation":
        """Move the model and the parameters to `device`; return self."""
        self.model = self.model.to(device)
        names = set(self.params)
        self.params = {n: p.detach() for n, p in self.model.named_parameters() if n in names}
        self._rebuild()
        return self

    def _rebuild(self) -> None:
        """Recreate the functions bound to the model's parameters (after `to`)."""

    def export_state(self) -> OperatorState:
        return OperatorState(type(self).__name__)

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "BatchOperation":
        model, loss, params = context.require_model(cls.__name__)
        return cls(model=model, loss=loss, restrict_to=params, **state.settings)  # type: ignore[call-arg, arg-type]

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


class LossBatchOperation(BatchOperation):
    """A batch operation defined by the model and the training loss on a batch.

    Args:
        model: the model.
        loss: the loss function `loss(outputs, targets)`, mean over the batch.
        restrict_to: the parameters; the operator is the corresponding sub-matrix.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(model, restrict_to)
        self.loss = loss
        self._rebuild()


class HessianBatchOperation(LossBatchOperation):
    r"""$V \mapsto V \nabla^2_\theta L_b(\theta)$ with $L_b = \text{loss}(f_\theta(x_b), y_b)$.

    Hessian-vector products are computed forward-over-reverse, all rows at once. Arguments
    as for [LossBatchOperation][influx.torch.curvature.batch_operation.LossBatchOperation].
    """

    def _rebuild(self) -> None:
        self._hvp = create_batch_hvp_function(self.model, self.loss, self.params)

    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        return self._hvp(self.params, batch.x, batch.y, tensor)  # type: ignore[no-any-return]

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        return batch_hessian(self.model, self.loss, self.params, batch.x, batch.y)


class GaussNewtonBatchOperation(LossBatchOperation):
    r"""$V \mapsto V G_b$ with the Gauss-Newton (empirical Fisher) matrix of the batch

    $$G_b = \frac{1}{|b|}\sum_{i \in b} \nabla_\theta \ell_i \nabla_\theta \ell_i^\top .$$

    Arguments as for [LossBatchOperation][influx.torch.curvature.batch_operation.LossBatchOperation].
    """

    def _rebuild(self) -> None:
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
        """`_rank_one_mvp`
        for vectors given in pieces (one tensor per parameter, leading dimensions `N` and
        `K`), returned in the same pieces."""
        xs, vs = list(x), list(v)
        n = xs[0].shape[0]
        products = [vi.reshape(vi.shape[0], -1) @ xi.reshape(n, -1).T for xi, vi in zip(xs, vs)]
        coefficients = torch.stack(products).sum(dim=0) / n
        return [(coefficients @ xi.reshape(n, -1)).reshape(vi.shape) for xi, vi in zip(xs, vs)]

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        grads = self.per_sample_grads(batch)
        return grads.T @ grads / grads.shape[0]


class InverseHarmonicMeanBatchOperation(GaussNewtonBatchOperation):
    r"""$v \mapsto \frac{1}{|b|}\sum_{i \in b} (g_i g_i^\top + \lambda I)^{-1} v$ for one batch.

    With $G$ `(|b|, P)` the per-sample gradients of the batch, for the rows $v$ of $V$:

    $$
    \frac{1}{\lambda}\left(v - \frac{1}{|b|}\sum_{i \in b}
    \frac{g_i^\top v}{\lambda + g_i^\top g_i}\, g_i\right),
    $$

    two matrix products per batch; the $P \times P$ inverses are never formed. See
    [influx.torch.inverse.inverse_harmonic_mean][influx.torch.inverse.inverse_harmonic_mean].

    Args:
        model: the model.
        loss: the loss function.
        regularization: $\lambda > 0$.
        restrict_to: the parameters; None means all trainable parameters.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        regularization: float,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(model, loss, restrict_to)
        self.regularization = regularization

    @property
    def regularization(self) -> float:
        r"""The regularization $\lambda > 0$ of every rank-one term."""
        return self._regularization

    @regularization.setter
    def regularization(self, value: float) -> None:
        validate_regularization(value)
        if value is None or value <= 0:
            raise ValueError(
                "Parameter 'regularization' must be positive for the inverse harmonic mean "
                f"(each rank-one term g g^T + λI must be invertible), got {value}."
            )
        self._regularization = float(value)

    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        return self._inverse_rank_one_update(
            self.per_sample_grads(batch), tensor, self.regularization
        )

    @staticmethod
    def _inverse_rank_one_update(
        x: torch.Tensor, v: torch.Tensor, regularization: float
    ) -> torch.Tensor:
        r"""$\frac{1}{N}\sum_i (x_i x_i^\top + \lambda I)^{-1} v_k$ for the rows $x_i$ of `x`
        `(N, P)` and $v_k$ of `v` `(K, P)` (Sherman-Morrison), shape `(K, P)`."""
        weights = (v @ x.T) / (regularization + (x * x).sum(dim=1))
        return (v - weights @ x / x.shape[0]) / regularization

    @staticmethod
    def _generate_inverse_rank_one_updates(
        x: Iterable[torch.Tensor], v: Iterable[torch.Tensor], regularization: float
    ) -> List[torch.Tensor]:
        """`_inverse_rank_one_update`
        for vectors given in pieces (one tensor per parameter, leading dimensions `N` and
        `K`), returned in the same pieces."""
        xs, vs = list(x), list(v)
        n = xs[0].shape[0]
        flat_x = [xi.reshape(n, -1) for xi in xs]
        flat_v = [vi.reshape(vi.shape[0], -1) for vi in vs]
        inner = torch.stack([vi @ xi.T for xi, vi in zip(flat_x, flat_v)]).sum(dim=0)
        norms = torch.stack([(xi * xi).sum(dim=1) for xi in flat_x]).sum(dim=0)
        weights = inner / (regularization + norms) / n
        return [
            ((vi - weights @ xi) / regularization).reshape(v_orig.shape)
            for xi, vi, v_orig in zip(flat_x, flat_v, vs)
        ]

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        return BatchOperation.to_dense(self, batch)

    def export_state(self) -> OperatorState:
        return OperatorState(type(self).__name__, settings={"regularization": self.regularization})


BatchOperationType = TypeVar("BatchOperationType", bound=BatchOperation)
