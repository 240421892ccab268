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

from typing import Dict, Iterable, List, Optional

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
        self._regularization = _check_positive_regularization(regularization)
        self.loss = loss
        self._build_functions()

    def _build_functions(self) -> None:
        self._grads = create_per_sample_gradient_function(self.model, self.loss, self.params)

    @property
    def regularization(self) -> float:
        """$\\lambda > 0$; it may be changed (nothing is recomputed)."""
        return self._regularization

    @regularization.setter
    def regularization(self, value: float) -> None:
        self._regularization = _check_positive_regularization(value)

    def per_sample_grads(self, batch: TorchBatch) -> torch.Tensor:
        """The per-sample gradients of the batch, shape `(|b|, P)`."""
        grads = self._grads(self.params, batch.x, batch.y)
        return flatten_dimensions(grads.values(), shape=(len(batch), -1))

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
        """[_inverse_rank_one_update][influx.torch.inverse_harmonic_mean.InverseHarmonicMeanBatchOperation._inverse_rank_one_update]
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
