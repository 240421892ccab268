r"""Curvature operators: the Hessian and Gauss-Newton matrices of the mean training loss.

A curvature operator averages a [batch operation][influx.torch.curvature.batch_operation] over a data
loader, weighting each batch by its number of points:

$$
C v = \frac{1}{n} \sum_b |b| \, C_b v , \qquad n = \sum_b |b| ,
$$

so the result equals the curvature of the mean loss over all $n$ points, whatever the batch
size and however uneven the last batch. Which curvature is chosen by a
[SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode]. Curvature operators carry no
regularization: $C + \lambda I$ is a
[ShiftedOperator][influx.torch.curvature.tensor_operator.ShiftedOperator], and the inverse operators
take $\lambda$ themselves.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Type

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import torch

from ..autodiff.derivatives import LossOrTask
from ..data.batches import TorchBatch, iterate_batches
from ..data.state import OperatorState, StateContext, restore_operator
from .batch_operation import (
    BatchOperation,
    GaussNewtonBatchOperation,
    HessianBatchOperation,
    LossBatchOperation,
)
from .generalized_gauss_newton import GeneralizedGaussNewtonBatchOperation
from .tensor_operator import TensorDictOperator

__all__ = [
    "SecondOrderMode",
    "AveragingBatchOperator",
    "ModelCurvatureOperator",
    "HessianOperator",
    "GaussNewtonOperator",
    "GeneralizedGaussNewtonOperator",
    "PrecomputedGaussNewtonOperator",
    "check_second_order_mode",
    "curvature_operator",
]

logger = logging.getLogger(__name__)


class SecondOrderMode(str, Enum):
    """Which curvature matrix an influence model inverts.

    * `HESSIAN`: the Hessian $\\nabla^2_\\theta L$ of the mean training loss.
    * `GAUSS_NEWTON`: the Gauss-Newton matrix (empirical Fisher)
      $\\frac{1}{n}\\sum_i \\nabla_\\theta \\ell_i \\nabla_\\theta \\ell_i^\\top$, positive
      semi-definite even away from a minimum.
    * `GENERALIZED_GAUSS_NEWTON`: the generalized Gauss-Newton matrix
      $\\frac{1}{n}\\sum_b |b|\\, J_b^\\top \\nabla^2_z L_b\\, J_b$ with $J_b$ the Jacobian of
      the model's outputs on batch $b$ and $\\nabla^2_z L_b$ the Hessian of the batch loss with
      respect to them (see [influx.torch.curvature.generalized_gauss_newton][]): the Hessian of the
      loss with the model linearised, positive semi-definite for cross-entropy and MSE.
    """

    HESSIAN = "hessian"
    GAUSS_NEWTON = "gauss_newton"
    GENERALIZED_GAUSS_NEWTON = "generalized_gauss_newton"


def check_second_order_mode(mode: SecondOrderMode) -> SecondOrderMode:
    """`mode` as a [SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode], or a ValueError
    naming 'second_order_mode' and the valid values."""
    try:
        return SecondOrderMode(mode)
    except ValueError:
        valid = [m.name for m in SecondOrderMode]
        raise ValueError(
            f"Parameter 'second_order_mode' must be one of {valid}, got {mode!r}."
        ) from None


class AveragingBatchOperator(TensorDictOperator):
    r"""The point-weighted average of a batch operation over a data loader.

    $$A v = \frac{1}{n}\sum_b |b|\, B_b v .$$

    Args:
        batch_operation: what one batch contributes.
        dataloader: the data, an iterable of `(x, y)` batches (iterated anew on each apply).
        progress: show a progress bar over the batches.
    """

    supports_regularization = False

    def _reference(self) -> Any:
        return self.batch_operation

    def __init__(
        self, batch_operation: BatchOperation, dataloader: DataLoader, progress: bool = False
    ):
        self.batch_operation = batch_operation
        self.dataloader = dataloader
        self.progress = progress

    @property
    def input_dict_structure(self) -> Dict[str, Tuple[int, ...]]:
        return self.batch_operation.input_dict_structure

    def _average(self, per_batch: Callable[[TorchBatch], torch.Tensor], desc: str) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        count = 0
        batches = iterate_batches(self.dataloader, self.device)
        for batch in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            if total is None:
                total = per_batch(batch) * len(batch)
            else:
                # In place: a dense (P, P) curvature is accumulated without temporaries.
                total.add_(per_batch(batch), alpha=len(batch))
            count += len(batch)
        if total is None:
            raise ValueError("Parameter 'dataloader' yielded no batches.")
        return total.div_(count)

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._average(lambda b: self.batch_operation.apply(b, tensor), "batches")

    def to_dense(self) -> torch.Tensor:
        """The matrix `(P, P)` of the averaged operator."""
        return self._average(self.batch_operation.to_dense, "curvature")

    def export_state(self) -> OperatorState:
        return OperatorState(
            type(self).__name__,
            settings={"progress": self.progress},
            children={"batch_operation": self.batch_operation.export_state()},
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "AveragingBatchOperator":
        new = cls.__new__(cls)
        AveragingBatchOperator.__init__(
            new,
            restore_operator(state.children["batch_operation"], context),
            context.require_data(cls.__name__),  # type: ignore[arg-type]
            progress=state.settings["progress"],
        )
        return new


class ModelCurvatureOperator(AveragingBatchOperator):
    """The average over the data of a batch operation of the model and the loss
    (`operation_class`).

    Args:
        model: the model.
        loss: the loss function (mean reduction).
        dataloader: the training data.
        restrict_to: the parameters; None means all trainable parameters.
    """

    operation_class: Type[LossBatchOperation] = HessianBatchOperation

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        dataloader: DataLoader,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(self.operation_class(model, loss, restrict_to), dataloader)


class HessianOperator(ModelCurvatureOperator):
    r"""The Hessian of the mean training loss, applied through Hessian-vector products.

    $$H v = \frac{1}{n}\sum_b |b|\, \nabla^2_\theta L_b(\theta)\, v, \qquad
    L_b(\theta) = \text{loss}(f_\theta(x_b), y_b) .$$

    Arguments as for [ModelCurvatureOperator][influx.torch.curvature.operators.ModelCurvatureOperator].
    """

    operation_class = HessianBatchOperation


class GaussNewtonOperator(ModelCurvatureOperator):
    r"""The Gauss-Newton matrix (empirical Fisher) of the training data.

    $$G v = \frac{1}{n}\sum_{i=1}^n \nabla_\theta \ell_i \, (\nabla_\theta \ell_i^\top v) .$$

    Arguments as for [ModelCurvatureOperator][influx.torch.curvature.operators.ModelCurvatureOperator].
    """

    operation_class = GaussNewtonBatchOperation


class GeneralizedGaussNewtonOperator(ModelCurvatureOperator):
    r"""The generalized Gauss-Newton matrix of the mean training loss.

    $$G v = \frac{1}{n}\sum_b |b|\, J_b^\top \nabla^2_z L_b(z_b)\, J_b v ,$$

    applied through Jacobian-vector and vector-Jacobian products, never forming $J_b$ (see
    [GeneralizedGaussNewtonBatchOperation][influx.torch.curvature.generalized_gauss_newton.GeneralizedGaussNewtonBatchOperation]).

    Arguments as for [ModelCurvatureOperator][influx.torch.curvature.operators.ModelCurvatureOperator].
    """

    operation_class = GeneralizedGaussNewtonBatchOperation


def curvature_operator(
    mode: SecondOrderMode,
    model: torch.nn.Module,
    loss: LossOrTask,
    dataloader: DataLoader,
    restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
) -> AveragingBatchOperator:
    """The Hessian, Gauss-Newton or generalized Gauss-Newton operator, as `mode` says.

    Raises:
        ValueError: for a mode that is not a [SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode].
    """
    mode = check_second_order_mode(mode)
    if mode is SecondOrderMode.HESSIAN:
        return HessianOperator(model, loss, dataloader, restrict_to)
    if mode is SecondOrderMode.GENERALIZED_GAUSS_NEWTON:
        return GeneralizedGaussNewtonOperator(model, loss, dataloader, restrict_to)
    return GaussNewtonOperator(model, loss, dataloader, restrict_to)


class PrecomputedGaussNewtonOperator(TensorDictOperator):
    r"""The Gauss-Newton matrix $G = \frac{1}{n} J^\top J$ from per-sample gradients $J$
    `(n, P)` computed once: $V \mapsto (V J^\top) J / n$.

    Args:
        batch_operation: the Gauss-Newton batch operation giving the per-sample gradients.
        data: the training data (iterated once, here).
    """

    supports_regularization = False

    def _reference(self) -> Any:
        return self.grads.T

    def __init__(self, batch_operation: GaussNewtonBatchOperation, data: Iterable):
        grads = [
            batch_operation.per_sample_grads(batch)
            for batch in iterate_batches(data, batch_operation.device)
        ]
        if not grads:
            raise ValueError("Parameter 'data' yielded no batches.")
        self._init(torch.cat(grads), batch_operation.input_dict_structure)

    def _init(self, grads: torch.Tensor, structure: Dict[str, Tuple[int, ...]]) -> None:
        self.grads = grads
        self._structure = dict(structure)

    @property
    def input_dict_structure(self) -> Dict[str, Tuple[int, ...]]:
        return dict(self._structure)

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.dtype)
        return (tensor @ self.grads.T) @ self.grads / self.grads.shape[0]

    def to_dense(self) -> torch.Tensor:
        """The matrix $J^\\top J / n$ `(P, P)`."""
        return self.grads.T @ self.grads / self.grads.shape[0]

    def export_state(self) -> OperatorState:
        return OperatorState(
            "PrecomputedGaussNewtonOperator",
            tensors={"grads": self.grads},
            settings={"structure": {k: list(v) for k, v in self._structure.items()}},
        )

    @classmethod
    def from_state(
        cls, state: OperatorState, context: StateContext
    ) -> "PrecomputedGaussNewtonOperator":
        new = cls.__new__(cls)
        structure = {k: tuple(v) for k, v in state.settings["structure"].items()}
        new._init(state.tensors["grads"], structure)
        return new
