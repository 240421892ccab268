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

Each term $g_i g_i^\top + \lambda I$ has the eigenvalues $\lambda$ and $\lambda + \|g_i\|^2$,
so the worst-conditioned term has

$$
\kappa = 1 + \frac{\max_i \|g_i\|^2}{\lambda},
$$

checked (one pass over the data when the operator is built) against what the dtype resolves
(see [influx.torch.curvature.conditioning][influx.torch.curvature.conditioning]): beyond it,
Sherman–Morrison cancels all significant digits along $g_i$.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

from torch.utils.data import DataLoader

import torch

from ...types import SolverDiagnostics
from ..autodiff.derivatives import LossOrTask
from ..curvature.batch_operation import InverseHarmonicMeanBatchOperation
from ..curvature.conditioning import block_prefix, check_eigenvalue_conditioning
from ..curvature.operators import AveragingBatchOperator
from ..data.batches import iterate_batches
from ..data.state import OperatorState, StateContext
from ..data.validation import check_nonconvergence_policy

__all__ = ["InverseHarmonicMeanBatchOperation", "InverseHarmonicMeanOperator"]


class InverseHarmonicMeanOperator(AveragingBatchOperator):
    r"""The DataInf approximation of $(G + \lambda I)^{-1}$ over a data loader.

    $$
    A v = \frac{1}{n}\sum_{i=1}^n \left(g_i g_i^\top + \lambda I\right)^{-1} v ,
    $$

    the [InverseHarmonicMeanBatchOperation][influx.torch.curvature.batch_operation.InverseHarmonicMeanBatchOperation]
    averaged over the batches, each weighted by its size, so the result does not depend on the
    batch size. This operator *is* the approximate inverse: it is applied, not inverted.

    Args:
        model: the model.
        loss: the loss function.
        dataloader: the training data (iterated on every application).
        regularization: $\lambda > 0$.
        restrict_to: the parameters; None means all trainable parameters.
        progress: show a progress bar over the batches.
        on_nonconvergence: `"warn"` (default) or `"raise"` (an
            [IllConditionedError][influx.errors.IllConditionedError]) when the worst term's
            condition number $1 + \max_i \|g_i\|^2 / \lambda$ exceeds what the dtype
            resolves.
        block_name: named in the messages, if given (the block of an influence model).
    """

    largest_squared_norm: float
    r"""$\max_i \|g_i\|^2$ over the data (computed once, reused for every $\lambda$)."""

    supports_regularization = True

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        dataloader: DataLoader,
        regularization: float,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
        progress: bool = False,
        on_nonconvergence: str = "warn",
        block_name: Optional[str] = None,
    ):
        self.block_name = block_name
        super().__init__(
            InverseHarmonicMeanBatchOperation(model, loss, regularization, restrict_to),
            dataloader,
            progress=progress,
        )
        self.on_nonconvergence = check_nonconvergence_policy(on_nonconvergence)
        self.largest_squared_norm = self._largest_squared_norm()
        self._regularization_changed()

    def _largest_squared_norm(self) -> float:
        r"""$\max_i \|g_i\|^2$ over the data, one pass."""
        operation = self.batch_operation
        assert isinstance(operation, InverseHarmonicMeanBatchOperation)
        largest = 0.0
        for batch in iterate_batches(self.dataloader, self.device):
            grads = operation.per_sample_grads(batch)
            largest = max(largest, float((grads * grads).sum(dim=1).max()))
        return largest

    @property
    def regularization(self) -> Optional[float]:
        return self.batch_operation.regularization  # type: ignore[attr-defined, no-any-return]

    @regularization.setter
    def regularization(self, value: Optional[float]) -> None:
        vars(self).update(vars(self.with_regularization(value)))

    def _check_regularization(self, regularization: Optional[float]) -> None:
        if regularization is None or regularization <= 0:
            raise ValueError(
                "Parameter 'regularization' must be positive for the inverse harmonic mean "
                f"(each rank-one term g g^T + λI must be invertible), got {regularization}."
            )

    def _regularization_changed(self) -> None:
        if self._regularization is not None:
            operation = copy.copy(self.batch_operation)
            operation.regularization = self._regularization  # type: ignore[attr-defined]
            self.batch_operation = operation
        self._regularization = self.regularization
        self.diagnostics = SolverDiagnostics(
            method="inverse_harmonic_mean",
            converged=True,
            iterations=None,
            residual=None,
            details={
                "regularization": self._regularization,
                "largest_squared_gradient_norm": self.largest_squared_norm,
            },
            regularization=self._regularization,
        )
        lam = float(self._regularization or 0.0)
        check_eigenvalue_conditioning(
            "inverse harmonic mean",
            torch.tensor([lam, lam + self.largest_squared_norm], dtype=torch.float64),
            self._regularization, self.dtype, self.on_nonconvergence, self.diagnostics,
            where=block_prefix(getattr(self, "block_name", None)),
        )  # fmt: skip

    def export_state(self) -> OperatorState:
        state = super().export_state()
        state.settings.update(
            on_nonconvergence=self.on_nonconvergence,
            largest_squared_norm=self.largest_squared_norm,
        )
        return state

    @classmethod
    def from_state(
        cls, state: OperatorState, context: StateContext
    ) -> "InverseHarmonicMeanOperator":
        new = super().from_state(state, context)
        assert isinstance(new, InverseHarmonicMeanOperator)
        new.on_nonconvergence = state.settings.get("on_nonconvergence", "warn")
        largest = state.settings.get("largest_squared_norm")
        new.largest_squared_norm = new._largest_squared_norm() if largest is None else largest
        new._regularization_changed()
        return new
