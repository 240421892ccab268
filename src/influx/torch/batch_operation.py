r"""What one batch contributes to a curvature operator.

A batch operation $B_b$ maps a batch $b$ and a matrix of row vectors $V$ `(K, P)` to
$V B_b^\top$. The operators in [influx.torch.operator][influx.torch.operator] average these
over a data loader, weighting each batch by its number of points.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Optional, Tuple

import torch

from .data import TorchBatch
from .functional import (
    LossFunction,
    create_batch_hessian_function,
    create_batch_hvp_function,
    create_per_sample_gradient_function,
    flatten_dimensions,
    gauss_newton,
    get_model_parameters,
    operator_to_dense,
)
from .tensor_operator import OperatorState, StateContext, Stateful
from .validation import validate_regularization

__all__ = [
    "BatchOperation",
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
        if tensor.ndim == 1:
            return self._apply(batch, tensor.unsqueeze(0)).squeeze(0)
        return self._apply(batch, tensor)

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
        loss: LossFunction,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(model, restrict_to)
        self.loss = loss
        self._rebuild()


class HessianBatchOperation(LossBatchOperation):
    r"""$V \mapsto V \nabla^2_\theta L_b(\theta)$ with $L_b = \text{loss}(f_\theta(x_b), y_b)$.

    Hessian-vector products are computed reverse-over-reverse for a few rows and
    forward-over-reverse, all rows at once, for many (see
    [create_batch_hvp_function][influx.torch.functional.create_batch_hvp_function]); the dense
    matrix reverse-over-reverse, sharing one forward and one backward pass among its columns.
    Arguments as for [LossBatchOperation][influx.torch.batch_operation.LossBatchOperation].
    """

    def _rebuild(self) -> None:
        self._hvp = create_batch_hvp_function(self.model, self.loss, self.params)
        self._dense = create_batch_hessian_function(self.model, self.loss, self.params)

    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        return self._hvp(self.params, batch.x, batch.y, tensor)  # type: ignore[no-any-return]

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        return self._dense(self.params, batch.x, batch.y, None)


class GaussNewtonBatchOperation(LossBatchOperation):
    r"""$V \mapsto V G_b$ with the Gauss-Newton (empirical Fisher) matrix of the batch

    $$G_b = \frac{1}{|b|}\sum_{i \in b} \nabla_\theta \ell_i \nabla_\theta \ell_i^\top .$$

    Arguments as for [LossBatchOperation][influx.torch.batch_operation.LossBatchOperation].
    """

    def _rebuild(self) -> None:
        self._grads = create_per_sample_gradient_function(self.model, self.loss, self.params)

    def per_sample_grads(self, batch: TorchBatch) -> torch.Tensor:
        """The per-sample gradients of the batch, shape `(|b|, P)`."""
        grads = self._grads(self.params, batch.x, batch.y)
        return flatten_dimensions(grads.values(), shape=(len(batch), -1))

    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        g = self.per_sample_grads(batch)
        return (tensor @ g.T) @ g / len(batch)

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        return gauss_newton(self.per_sample_grads(batch))


class InverseHarmonicMeanBatchOperation(GaussNewtonBatchOperation):
    r"""$v \mapsto \frac{1}{|b|}\sum_{i \in b} (g_i g_i^\top + \lambda I)^{-1} v$ for one batch.

    With $G$ `(|b|, P)` the per-sample gradients of the batch, for the rows $v$ of $V$:

    $$
    \frac{1}{\lambda}\left(v - \frac{1}{|b|}\sum_{i \in b}
    \frac{g_i^\top v}{\lambda + g_i^\top g_i}\, g_i\right),
    $$

    two matrix products per batch; the $P \times P$ inverses are never formed. See
    [influx.torch.inverse_harmonic_mean][influx.torch.inverse_harmonic_mean].

    Args:
        model: the model.
        loss: the loss function.
        regularization: $\lambda > 0$.
        restrict_to: the parameters; None means all trainable parameters.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
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
        grads = self.per_sample_grads(batch)
        lam = self.regularization
        weights = (tensor @ grads.T) / (lam + (grads * grads).sum(dim=1))
        return (tensor - weights @ grads / len(batch)) / lam

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        return BatchOperation.to_dense(self, batch)

    def export_state(self) -> OperatorState:
        return OperatorState(type(self).__name__, settings={"regularization": self.regularization})
