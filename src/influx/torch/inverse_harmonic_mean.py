r"""The inverse harmonic mean of rank-one curvatures (DataInf).

The damped Gauss-Newton matrix is an arithmetic mean of rank-one terms,

$$
G_\lambda = \frac{1}{n}\sum_{i=1}^n \left(g_i g_i^\top + \lambda I\right), \qquad
g_i = \nabla_\theta \ell(x_i, y_i; \theta) .
$$

Exchanging the mean and the inverse gives the approximation of $G_\lambda^{-1}$ used by
DataInf (Kwon et al., 2024),

$$
G_\lambda^{-1} \approx \frac{1}{n}\sum_{i=1}^n \left(g_i g_i^\top + \lambda I\right)^{-1},
$$

i.e. the inverse of the harmonic mean of the rank-one terms. Each term is inverted in closed
form by the Sherman–Morrison formula,

$$
\left(g g^\top + \lambda I\right)^{-1} v
= \frac{1}{\lambda}\left(v - \frac{g^\top v}{\lambda + g^\top g}\, g\right),
$$

vectorised over the points of a batch and averaged over the data weighting every batch by its
size. Nothing is fitted: each application is one pass over the data computing per-sample
gradients, and changing $\lambda$ is free.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader

from ..types import SolverDiagnostics
from .base import TorchBatch
from .batch_operation import BatchOperation
from .functional import LossFunction, create_per_sample_gradient_function, flatten_dimensions
from .operator import AveragingBatchOperator
from .util import validate_regularization

__all__ = ["InverseHarmonicMeanBatchOperation", "InverseHarmonicMeanOperator"]


def _check_positive_regularization(regularization: Optional[float]) -> float:
    validate_regularization(regularization)
    if regularization is None or regularization <= 0:
        raise ValueError(
            "Parameter 'regularization' must be positive for the inverse harmonic mean (each "
            f"rank-one term g g^T + λI must be invertible), got {regularization}."
        )
    return float(regularization)


class InverseHarmonicMeanBatchOperation(BatchOperation):
    r"""$v \mapsto \frac{1}{|b|}\sum_{i \in b} (g_i g_i^\top + \lambda I)^{-1} v$ for one batch.

    With $G$ `(|b|, P)` the per-sample gradients of the batch, for the rows $v$ of $V$:

    $$
    \frac{1}{\lambda}\left(v - \frac{1}{|b|}\sum_{i \in b}
    \frac{g_i^\top v}{\lambda + g_i^\top g_i}\, g_i\right),
    $$

    two matrix products per batch; the $P \times P$ inverses are never formed.

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
        super().__init__(model, restrict_to)
        self.regularization = _check_positive_regularization(regularization)
        self.loss = loss
        self._grads = create_per_sample_gradient_function(model, loss, self.params)

    def per_sample_grads(self, batch: TorchBatch) -> torch.Tensor:
        """The per-sample gradients of the batch, shape `(|b|, P)`."""
        grads = self._grads(self.params, batch.x, batch.y)
        return flatten_dimensions(grads.values(), shape=(len(batch), -1))

    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        grads = self.per_sample_grads(batch)
        lam = self.regularization
        weights = (tensor @ grads.T) / (lam + (grads * grads).sum(dim=1))
        return (tensor - weights @ grads / len(batch)) / lam


class InverseHarmonicMeanOperator(AveragingBatchOperator):
    r"""The DataInf approximation of $(G + \lambda I)^{-1}$ over a data loader.

    $$
    A v = \frac{1}{n}\sum_{i=1}^n \left(g_i g_i^\top + \lambda I\right)^{-1} v ,
    $$

    the [InverseHarmonicMeanBatchOperation][influx.torch.inverse_harmonic_mean.InverseHarmonicMeanBatchOperation]
    averaged over the batches, each weighted by its size, so the result does not depend on the
    batch size. This operator *is* the approximate inverse: it is applied, not inverted.

    Args:
        model: the model.
        loss: the loss function.
        dataloader: the training data (iterated on every application).
        regularization: $\lambda > 0$.
        restrict_to: the parameters; None means all trainable parameters.
        progress: show a progress bar over the batches.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        dataloader: DataLoader,
        regularization: float,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
        progress: bool = False,
    ):
        self._regularization = _check_positive_regularization(regularization)
        self._model, self._loss, self._restrict_to = model, loss, restrict_to
        super().__init__(
            InverseHarmonicMeanBatchOperation(model, loss, self._regularization, restrict_to),
            dataloader,
            progress=progress,
        )
        self.diagnostics = SolverDiagnostics(
            method="inverse_harmonic_mean",
            converged=True,
            iterations=None,
            residual=None,
            details={"regularization": self._regularization},
        )

    def with_regularization(self, regularization: Optional[float]) -> "InverseHarmonicMeanOperator":
        """The same operator with another $\\lambda > 0$ (nothing to recompute)."""
        return InverseHarmonicMeanOperator(
            self._model,
            self._loss,
            self.dataloader,
            regularization,  # type: ignore[arg-type]
            self._restrict_to,
            self.progress,
        )
