r"""Operators: curvature matrices averaged over data, and their (approximate) inverses.

Curvature operators ([HessianOperator][influx.torch.operator.HessianOperator],
[GaussNewtonOperator][influx.torch.operator.GaussNewtonOperator],
[GeneralizedGaussNewtonOperator][influx.torch.operator.GeneralizedGaussNewtonOperator]) average a
[batch operation][influx.torch.batch_operation] over a data loader, weighting each batch by
its number of points:

$$
C v = \frac{1}{n} \sum_b |b| \, C_b v , \qquad n = \sum_b |b| ,
$$

so the result equals the curvature of the mean loss over all $n$ points, whatever the batch
size and however uneven the last batch.

Inverse operators apply $(C + \lambda I)^{-1}$:
[DirectSolveOperator][influx.torch.operator.DirectSolveOperator] factorises a dense matrix
once and reuses the factorisation.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..types import SolverDiagnostics
from .base import TensorDictOperator, TensorOperator, TorchBatch
from .batch_operation import BatchOperation, GaussNewtonBatchOperation, HessianBatchOperation
from .functional import LossFunction
from .generalized_gauss_newton import GeneralizedGaussNewtonBatchOperation
from .util import validate_regularization

__all__ = [
    "SecondOrderMode",
    "AveragingBatchOperator",
    "HessianOperator",
    "GaussNewtonOperator",
    "GeneralizedGaussNewtonOperator",
    "MatrixOperator",
    "DirectSolveOperator",
    "curvature_operator",
    "iterate_batches",
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
      respect to them (see [influx.torch.generalized_gauss_newton][]): the Hessian of the
      loss with the model linearised, positive semi-definite for cross-entropy and MSE.
    """

    HESSIAN = "hessian"
    GAUSS_NEWTON = "gauss_newton"
    GENERALIZED_GAUSS_NEWTON = "generalized_gauss_newton"


def iterate_batches(
    data: Iterable, device: torch.device, name: str = "data"
) -> Iterator[TorchBatch]:
    """Yield the `(x, y)` batches of a data loader as [TorchBatch][influx.torch.base.TorchBatch]
    on `device`; `name` is the parameter named in the error for anything but pairs."""
    for index, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"Parameter '{name}' must yield pairs (x, y) of tensors; batch "
                f"{index} is a {type(batch).__name__}"
                + (f" of length {len(batch)}." if isinstance(batch, (tuple, list)) else ".")
            )
        yield TorchBatch(batch[0], batch[1]).to(device)


class AveragingBatchOperator(TensorDictOperator):
    r"""The point-weighted average of a batch operation over a data loader.

    $$A v = \frac{1}{n}\sum_b |b|\, B_b v .$$

    Args:
        batch_operation: what one batch contributes.
        dataloader: the data, an iterable of `(x, y)` batches (iterated anew on each apply).
        progress: show a progress bar over the batches.
    """

    def __init__(
        self, batch_operation: BatchOperation, dataloader: DataLoader, progress: bool = False
    ):
        self.batch_operation = batch_operation
        self.dataloader = dataloader
        self.progress = progress

    @property
    def input_size(self) -> int:
        return self.batch_operation.input_size

    @property
    def input_dict_structure(self) -> Dict[str, Tuple[int, ...]]:
        return self.batch_operation.input_dict_structure

    @property
    def device(self) -> torch.device:
        return self.batch_operation.device

    @property
    def dtype(self) -> torch.dtype:
        return self.batch_operation.dtype

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


class HessianOperator(AveragingBatchOperator):
    r"""The Hessian of the mean training loss, applied through Hessian-vector products.

    $$H v = \frac{1}{n}\sum_b |b|\, \nabla^2_\theta L_b(\theta)\, v, \qquad
    L_b(\theta) = \text{loss}(f_\theta(x_b), y_b) .$$

    Args:
        model: the model.
        loss: the loss function (mean reduction).
        dataloader: the training data.
        restrict_to: the parameters the Hessian is taken with respect to; None means all
            trainable parameters.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        dataloader: DataLoader,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(HessianBatchOperation(model, loss, restrict_to), dataloader)


class GaussNewtonOperator(AveragingBatchOperator):
    r"""The Gauss-Newton matrix (empirical Fisher) of the training data.

    $$G v = \frac{1}{n}\sum_{i=1}^n \nabla_\theta \ell_i \, (\nabla_\theta \ell_i^\top v) .$$

    Args:
        model: the model.
        loss: the loss function.
        dataloader: the training data.
        restrict_to: the parameters; None means all trainable parameters.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        dataloader: DataLoader,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(GaussNewtonBatchOperation(model, loss, restrict_to), dataloader)


class GeneralizedGaussNewtonOperator(AveragingBatchOperator):
    r"""The generalized Gauss-Newton matrix of the mean training loss.

    $$G v = \frac{1}{n}\sum_b |b|\, J_b^\top \nabla^2_z L_b(z_b)\, J_b v ,$$

    applied through Jacobian-vector and vector-Jacobian products, never forming $J_b$ (see
    [GeneralizedGaussNewtonBatchOperation][influx.torch.generalized_gauss_newton.GeneralizedGaussNewtonBatchOperation]).

    Args:
        model: the model.
        loss: the loss function (mean reduction).
        dataloader: the training data.
        restrict_to: the parameters; None means all trainable parameters.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        dataloader: DataLoader,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        super().__init__(GeneralizedGaussNewtonBatchOperation(model, loss, restrict_to), dataloader)


def curvature_operator(
    mode: SecondOrderMode,
    model: torch.nn.Module,
    loss: LossFunction,
    dataloader: DataLoader,
    restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
) -> AveragingBatchOperator:
    """The Hessian, Gauss-Newton or generalized Gauss-Newton operator, as `mode` says.

    Raises:
        ValueError: for a mode that is not a [SecondOrderMode][influx.torch.operator.SecondOrderMode].
    """
    try:
        mode = SecondOrderMode(mode)
    except ValueError:
        valid = [m.name for m in SecondOrderMode]
        raise ValueError(
            f"Parameter 'second_order_mode' must be one of {valid}, got {mode!r}."
        ) from None
    if mode is SecondOrderMode.HESSIAN:
        return HessianOperator(model, loss, dataloader, restrict_to)
    if mode is SecondOrderMode.GENERALIZED_GAUSS_NEWTON:
        return GeneralizedGaussNewtonOperator(model, loss, dataloader, restrict_to)
    return GaussNewtonOperator(model, loss, dataloader, restrict_to)


class MatrixOperator(TensorOperator):
    """A dense matrix $A$ acting on rows: $v \\mapsto A v$.

    Args:
        matrix: a square matrix `(P, P)`.
    """

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"Parameter 'matrix' must be a square matrix, got shape {tuple(matrix.shape)}."
            )
        self.matrix = matrix
        self._size = int(matrix.shape[0])
        self._device = matrix.device
        self._dtype = matrix.dtype

    @property
    def input_size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor @ self.matrix.T


class DirectSolveOperator(TensorOperator):
    r"""Solves $(A + \lambda I) x = b$ for a dense matrix $A$ with a factorisation computed once.

    The factorisation is a Cholesky decomposition when $A + \lambda I$ is positive definite;
    otherwise an LU decomposition; if the matrix is singular, a pseudo-inverse through the
    symmetric eigendecomposition (eigenvalues below a relative tolerance are dropped, with a
    warning). Every `apply` reuses it.

    Args:
        matrix: the system matrix $A$ `(P, P)`, symmetric.
        regularization: $\lambda \ge 0$, or None for none.
        in_place_regularization: add $\lambda$ to the diagonal of `matrix` in place instead of
            on a copy (saves memory for large matrices; `matrix` is modified).
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        regularization: Optional[float] = None,
        in_place_regularization: bool = False,
    ):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"Parameter 'matrix' must be a square matrix, got shape {tuple(matrix.shape)}."
            )
        validate_regularization(regularization)
        self._regularization = regularization
        lam = regularization or 0.0
        if in_place_regularization:
            matrix.diagonal().add_(lam)
            regularized = matrix
            self._base: Optional[torch.Tensor] = None
        else:
            regularized = matrix.clone()
            regularized.diagonal().add_(lam)
            self._base = matrix
        self._size = int(matrix.shape[0])
        self._dtype = matrix.dtype
        self._device = matrix.device
        self._factorize(regularized)
        self.diagnostics = SolverDiagnostics(
            method=f"direct/{self._method}", converged=True, iterations=None, residual=None
        )

    @property
    def matrix(self) -> torch.Tensor:
        """The regularized matrix $A + \\lambda I$."""
        if self._base is None:
            raise ValueError(
                "The matrix was regularized in place and is not kept: use the tensor passed "
                "as 'matrix'."
            )
        return self._base + (self._regularization or 0.0) * torch.eye(
            self._size, dtype=self._dtype, device=self._device
        )

    def _factorize(self, matrix: torch.Tensor) -> None:
        self._factors: Tuple[torch.Tensor, ...]
        chol, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            self._method, self._factors = "cholesky", (chol,)
            return
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        if int(info) == 0 and torch.isfinite(lu).all():
            logger.debug("Matrix is not positive definite: using an LU factorisation.")
            self._method, self._factors = "lu", (lu, pivots)
            return
        evals, evecs = torch.linalg.eigh(matrix)
        tol = evals.abs().max() * matrix.shape[0] * torch.finfo(evals.dtype).eps
        keep = evals.abs() > tol
        logger.warning(
            "The regularized matrix is singular (%d of %d eigenvalues below %.3g): using its "
            "pseudo-inverse. Increase the regularization to make it invertible.",
            int((~keep).sum()),
            evals.numel(),
            float(tol),
        )
        self._method, self._factors = "eigh", (evals[keep], evecs[:, keep])

    @property
    def input_size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def factorization(self) -> str:
        """Which factorisation is used: `"cholesky"`, `"lu"` or `"eigh"` (pseudo-inverse)."""
        return self._method

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        rhs = tensor.T.to(self.dtype)
        if self._method == "cholesky":
            solution = torch.cholesky_solve(rhs, self._factors[0])
        elif self._method == "lu":
            solution = torch.linalg.lu_solve(self._factors[0], self._factors[1], rhs)
        else:
            evals, evecs = self._factors
            solution = evecs @ ((evecs.T @ rhs) / evals.unsqueeze(1))
        return solution.T

    def with_regularization(self, regularization: Optional[float]) -> "DirectSolveOperator":
        """A new operator for another $\\lambda$ on the same matrix (refactorised)."""
        validate_regularization(regularization)
        if self._base is None:
            raise ValueError(
                "A DirectSolveOperator created with in_place_regularization=True does not keep "
                "the unregularized matrix: create a new operator instead."
            )
        return DirectSolveOperator(self._base, regularization)


_ELSEWHERE = {
    "LowRankOperator": "low_rank",
    "InverseHarmonicMeanOperator": "inverse_harmonic_mean",
    "CgOperator": "iterative",
    "LissaOperator": "iterative",
}


def __getattr__(name: str) -> object:
    # These operators live in their own modules (which import this one); they are also
    # reachable here, where the reference API places them.
    if name in _ELSEWHERE:
        import importlib

        module = importlib.import_module(f"{__package__}.{_ELSEWHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
