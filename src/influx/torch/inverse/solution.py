"""What an iterative solve returns, and how it is reported.

Shared by [conjugate gradient][influx.torch.inverse.cg] and [LiSSA][influx.torch.inverse.lissa]: an
[IterativeSolution][influx.torch.inverse.solution.IterativeSolution] per solve, turned into
[SolverDiagnostics][influx.types.SolverDiagnostics] and logged when a right-hand side did not
converge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ...errors import NonConvergenceError
from ...types import SolverDiagnostics

__all__ = ["IterativeSolution", "diagnostics_of", "report_non_convergence", "row_dot"]

logger = logging.getLogger(__name__)


@dataclass
class IterativeSolution:
    """The result of an iterative solve of several right-hand sides.

    Attributes:
        solution: the approximate solutions, one row per right-hand side, `(N, P)`.
        iterations: per right-hand side, the iteration at which it converged (or the last
            iteration it took part in), `(N,)`.
        residuals: per right-hand side, the achieved relative residual
            $\\|b - (A + \\lambda I)x\\| / \\|b\\|$ for CG, the last relative change
            $\\|h_{t+1} - h_t\\| / \\|h_{t+1}\\|$ for LiSSA, `(N,)` (0 where $b = 0$).
        converged: per right-hand side, whether it reached the tolerance, `(N,)`.
        spectrum: estimates `(smallest, largest)` of the extreme eigenvalues of the solved
            system (CG's Ritz values), None where not estimated.
        negative_curvature: per right-hand side, whether the solve stopped at a search
            direction $p$ with $p^\top M p \\le 0$ (CG), None where not checked.
    """

    solution: torch.Tensor
    iterations: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    spectrum: Optional[Tuple[float, float]] = None
    negative_curvature: Optional[torch.Tensor] = None

    @property
    def max_iterations(self) -> int:
        """The largest number of iterations over the right-hand sides."""
        return int(self.iterations.max()) if self.iterations.numel() else 0

    @property
    def max_residual(self) -> float:
        """The largest relative residual (or relative change) over the right-hand sides."""
        return float(self.residuals.max()) if self.residuals.numel() else 0.0

    @property
    def all_converged(self) -> bool:
        """Whether every right-hand side converged."""
        return bool(self.converged.all())


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The inner products of corresponding rows of `a` and `b`."""
    return (a * b).sum(dim=1)


def report_non_convergence(
    method: str,
    result: IterativeSolution,
    warn: bool,
    what: str,
    hint: str,
    on_nonconvergence: str = "warn",
    diagnostics: Optional[SolverDiagnostics] = None,
) -> None:
    """Report the right-hand sides that did not converge, with the achieved `what` and a
    `hint`: raise a [NonConvergenceError][influx.errors.NonConvergenceError] carrying
    `diagnostics` if `on_nonconvergence == "raise"`, else log (a warning if `warn`, else at
    debug level)."""
    if result.all_converged:
        return
    message = (
        f"{method} did not converge for {int((~result.converged).sum())} of "
        f"{result.converged.numel()} right-hand sides within {result.max_iterations} "
        f"iterations: achieved {what} {result.max_residual:.3g}. {hint}"
    )
    if on_nonconvergence == "raise":
        raise NonConvergenceError(message, diagnostics)
    logger.log(logging.WARNING if warn else logging.DEBUG, "%s", message)


def diagnostics_of(method: str, result: IterativeSolution, **details: object) -> SolverDiagnostics:
    """The diagnostics of a solve: maxima over right-hand sides, per right-hand side figures
    in `details`."""
    return SolverDiagnostics(
        method=method,
        converged=result.all_converged,
        iterations=result.max_iterations,
        residual=result.max_residual,
        details={
            "iterations_per_rhs": result.iterations.tolist(),
            "residual_per_rhs": result.residuals.tolist(),
            **details,
        },
    )
