r"""The direct solve: $(A + \lambda I)^{-1}$ of a dense matrix through a factorisation computed
once and reused by every application."""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from ...errors import NonFiniteCurvatureError
from ...types import SolverDiagnostics
from ..curvature.tensor_operator import TensorOperator
from ..data.state import OperatorState, StateContext
from ..data.validation import check_nonconvergence_policy, is_finite, validate_regularization
from .conditioning import block_prefix, check_eigenvalue_conditioning

__all__ = ["DirectSolveOperator"]

logger = logging.getLogger(__name__)

EXACT_SPECTRUM_LIMIT = 4096
"""Up to this size the condition number comes from the eigenvalues (`eigvalsh`, a few times
the cost of the factorisation); above, from the pivots of the factorisation (a lower bound)."""


class DirectSolveOperator(TensorOperator):
    r"""Solves $(A + \lambda I) x = b$ for a dense matrix $A$ with a factorisation computed once.

    The factorisation is a Cholesky decomposition when $A + \lambda I$ is positive definite;
    otherwise an LU decomposition; if the matrix is singular, a pseudo-inverse through the
    symmetric eigendecomposition (eigenvalues below a relative tolerance are dropped, with a
    warning). Every `apply` reuses it. A matrix with NaN or Inf raises a
    [NonFiniteCurvatureError][influx.errors.NonFiniteCurvatureError] instead of falling back
    to a meaningless pseudo-inverse.

    The condition number $\kappa$ of $A + \lambda I$ is estimated from its eigenvalues (for
    $P \le 4096$; above, from the factorisation's pivots: the squared diagonal of the Cholesky
    factor or the diagonal of $U$, a lower bound). If $\kappa > 1 / (100\,\varepsilon)$ of the
    dtype (see [influx.torch.inverse.conditioning][influx.torch.inverse.conditioning]) the
    solve is not reported converged, and `on_nonconvergence="raise"` (the default) raises an
    [IllConditionedError][influx.errors.IllConditionedError] naming $\lambda$ and the smallest
    safe $\lambda$.

    Args:
        matrix: the system matrix $A$ `(P, P)`, symmetric.
        regularization: $\lambda \ge 0$, or None for none.
        in_place_regularization: add $\lambda$ to the diagonal of `matrix` in place instead of
            on a copy (saves memory for large matrices; `matrix` is modified).
        on_nonconvergence: `"raise"` (default) or `"warn"` (log a warning and factorise
            anyway) for a matrix too ill-conditioned for its dtype.
        block_name: named in the messages, if given (the block of an influence model).
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        regularization: Optional[float] = None,
        in_place_regularization: bool = False,
        on_nonconvergence: str = "raise",
        block_name: Optional[str] = None,
    ):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"Parameter 'matrix' must be a square matrix, got shape {tuple(matrix.shape)}."
            )
        validate_regularization(regularization)
        self.on_nonconvergence = check_nonconvergence_policy(on_nonconvergence)
        self.block_name = block_name
        self._regularization = regularization
        self._size = int(matrix.shape[0])
        if in_place_regularization:
            matrix.diagonal().add_(regularization or 0.0)
            self._base: Optional[torch.Tensor] = None
            self._factorize(matrix)
        else:
            self._base = matrix
            self._regularization_changed()

    def _regularization_changed(self) -> None:
        if self._base is None:
            raise ValueError(
                "A DirectSolveOperator created with in_place_regularization=True does not keep "
                "the unregularized matrix: create a new operator instead."
            )
        regularized = self._base.clone()
        regularized.diagonal().add_(self._regularization or 0.0)
        self._factorize(regularized)

    def export_state(self) -> OperatorState:
        if self._base is None:
            raise ValueError(
                "A DirectSolveOperator created with in_place_regularization=True does not keep "
                "the unregularized matrix and cannot export its state."
            )
        return OperatorState(
            "DirectSolveOperator",
            tensors={"matrix": self._base},
            settings={
                "regularization": self._regularization,
                "on_nonconvergence": self.on_nonconvergence,
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "DirectSolveOperator":
        return cls(
            state.tensors["matrix"],
            state.settings["regularization"],
            on_nonconvergence=state.settings.get("on_nonconvergence", "raise"),
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
            self._size, dtype=self._base.dtype, device=self._base.device
        )

    def _factorize(self, matrix: torch.Tensor) -> None:
        self._check_matrix(matrix)
        if matrix.shape[0] <= EXACT_SPECTRUM_LIMIT:
            spectrum = torch.linalg.eigvalsh(matrix)
        else:
            spectrum = None
        self._decompose(matrix)
        if spectrum is None:
            spectrum = self._pivots()
        self.diagnostics = SolverDiagnostics(
            method=f"direct/{self._method}",
            converged=True,
            iterations=None,
            residual=None,
            regularization=self._regularization,
        )
        check_eigenvalue_conditioning(
            "direct solve", spectrum, self._regularization, matrix.dtype,
            self.on_nonconvergence, self.diagnostics, where=block_prefix(self.block_name),
        )  # fmt: skip

    def _pivots(self) -> torch.Tensor:
        """Eigenvalue-like magnitudes from the factorisation (for large matrices)."""
        if self._method == "cholesky":
            return torch.diagonal(self._factors[0]) ** 2
        if self._method == "lu":
            return torch.diagonal(self._factors[0]).abs()
        return self._factors[0]

    @staticmethod
    def _check_matrix(matrix: torch.Tensor) -> None:
        if not is_finite(matrix):
            raise NonFiniteCurvatureError(
                "the matrix to factorise holds NaN or Inf, so it has no meaningful inverse "
                "(no regularization helps): the curvature was computed from non-finite "
                "inputs, targets, losses or parameters"
            )
        if matrix.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"Parameter 'matrix' must be float32 or float64 to be factorised, got "
                f"{matrix.dtype}: use compute_dtype=torch.float32."
            )

    def _decompose(self, matrix: torch.Tensor) -> None:
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
        return self._factors[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self._factors[0].dtype

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
