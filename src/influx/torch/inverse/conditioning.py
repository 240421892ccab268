r"""The conditioning checks of iterative solves: CG's Ritz values, its default `maxiter`.

The limit $\kappa_{\max} = 1 / (100\,\varepsilon)$ of the compute dtype, the smallest safe
$\lambda$ and the report of an ill-conditioned system (see
[influx.torch.curvature.conditioning][influx.torch.curvature.conditioning], re-exported here)
are shared by every inverse method; this module adds what iterative solves estimate along the
way.
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple

import torch

from ...types import SolverDiagnostics
from ..curvature.conditioning import (
    block_prefix,
    check_eigenvalue_conditioning,
    condition_number,
    max_condition_number,
    report_ill_conditioning,
    safe_regularization,
)
from .solution import IterativeSolution

__all__ = [
    "MAXITER_CAP",
    "block_prefix",
    "cg_ritz_values",
    "check_eigenvalue_conditioning",
    "check_solve_conditioning",
    "default_maxiter",
    "condition_number",
    "max_condition_number",
    "report_ill_conditioning",
    "safe_regularization",
]

logger = logging.getLogger(__name__)

MAXITER_CAP = 1000
"""The default `maxiter` is $\\min(10 P, 1000)$: CG in exact arithmetic needs at most $P$
iterations, and a system that 1000 iterations do not solve needs a preconditioner or a larger
$\\lambda$ rather than more iterations (each one applies the curvature to every unconverged
right-hand side)."""


def default_maxiter(size: int) -> int:
    """$\\min(10 P, 1000)$ (see [MAXITER_CAP][influx.torch.inverse.conditioning.MAXITER_CAP])."""
    return min(10 * size, MAXITER_CAP)


def cg_ritz_values(alphas: List[float], betas: List[float]) -> Tuple[float, float]:
    r"""The extreme Ritz values of the Lanczos tridiagonal of a CG recurrence.

    CG's step lengths $\alpha_j$ and $\beta_j = r_{j+1}^\top z_{j+1} / r_j^\top z_j$ define
    $T_k$ with diagonal $1/\alpha_j + \beta_{j-1}/\alpha_{j-1}$ ($\beta_{-1} = 0$) and
    off-diagonal $\sqrt{\beta_j}/\alpha_j$; its eigenvalues approximate those of the
    (preconditioned) system from the inside, the extremes first.

    Returns:
        `(smallest, largest)`.
    """
    k = len(alphas)
    a = torch.tensor(alphas, dtype=torch.float64)
    b = torch.tensor(betas[: k - 1], dtype=torch.float64)
    diagonal = 1.0 / a
    diagonal[1:] += b / a[:-1]
    off = torch.sqrt(b) / a[:-1]
    tridiagonal = torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(tridiagonal)
    return float(ritz[0]), float(ritz[-1])


def check_solve_conditioning(
    method: str,
    result: IterativeSolution,
    diagnostics: Optional[SolverDiagnostics],
    regularization: Optional[float],
    dtype: torch.dtype,
    on_nonconvergence: str,
    warn: bool,
    where: str = "",
) -> None:
    """Complete the `diagnostics` of an iterative solve from its spectrum estimates (the
    condition number, `converged=False` for negative curvature or a condition number the dtype
    does not resolve) and report such a system per the policy."""
    if result.spectrum is None or diagnostics is None:
        return
    low, high = result.spectrum
    indefinite = low <= 0 or (
        result.negative_curvature is not None and bool(result.negative_curvature.any())
    )
    kappa = math.inf if indefinite else high / low
    diagnostics.condition_number = kappa
    diagnostics.details["spectrum_estimate"] = [low, high]
    if kappa <= max_condition_number(dtype):
        return
    diagnostics.converged = False
    safe = safe_regularization(low, high, regularization, dtype)
    diagnostics.details["safe_regularization"] = safe
    detail = None
    if indefinite:
        stopped = " and stopped" if result.negative_curvature is not None else ""
        detail = (
            f"is not positive definite: {method} met curvature p^T(C + λI)p <= 0 along a "
            f"search direction (smallest eigenvalue estimate {low:.3g}){stopped}"
        )
    report_ill_conditioning(
        method, kappa, safe, regularization, dtype, on_nonconvergence, warn, diagnostics,
        where, detail,
    )  # fmt: skip
