r"""What a solver may call solved: the condition number the compute dtype resolves.

A solve of $(C + \lambda I)x = b$ in a dtype with machine epsilon $\varepsilon$ loses about
$\log_{10} \kappa$ digits, $\kappa = |\mu|_{\max} / |\mu|_{\min}$ over the eigenvalues $\mu$ of
$C + \lambda I$. Every solver estimates $\kappa$ of what it inverts and refuses to report
`converged=True` when

$$
\kappa > \kappa_{\max} = \frac{1}{100\,\varepsilon}
$$

($4.5 \cdot 10^{13}$ in float64, $8.4 \cdot 10^{4}$ in float32): the answer would keep fewer
than two significant digits. The smallest safe regularization follows from the extreme
eigenvalues $\mu_{\min} \le \mu_{\max}$ of the curvature $C$ (without $\lambda$):

$$
\frac{\mu_{\max} + \lambda}{\mu_{\min} + \lambda} \le \kappa_{\max}
\iff \lambda \ge \lambda_{\text{safe}} = \frac{\mu_{\max} - \kappa_{\max}\,\mu_{\min}}
{\kappa_{\max} - 1},
$$

which also exceeds $-\mu_{\min}$ for an indefinite curvature.
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple

import torch

from ...errors import IllConditionedError
from ...types import SolverDiagnostics
from .solution import IterativeSolution

__all__ = [
    "MAXITER_CAP",
    "cg_ritz_values",
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


def max_condition_number(dtype: torch.dtype) -> float:
    r"""$\kappa_{\max} = 1 / (100\,\varepsilon)$ of `dtype`."""
    return 1.0 / (100.0 * torch.finfo(dtype).eps)


def condition_number(eigenvalues: torch.Tensor) -> float:
    r"""$\kappa = \max |\mu| / \min |\mu|$ over `eigenvalues` (inf if one is zero)."""
    magnitudes = eigenvalues.abs()
    bottom = float(magnitudes.min())
    return math.inf if bottom == 0 else float(magnitudes.max()) / bottom


def cg_ritz_values(alphas: List[float], betas: List[float]) -> Tuple[float, float]:
    r"""The extreme Ritz values of the Lanczos tridiagonal of a CG recurrence.

    CG's step lengths $lpha_j$ and $eta_j = r_{j+1}^	op z_{j+1} / r_j^	op z_j$ define
    $T_k$ with diagonal $1/lpha_j + eta_{j-1}/lpha_{j-1}$ ($eta_{-1} = 0$) and
    off-diagonal $\sqrt{eta_j}/lpha_j$; its eigenvalues approximate those of the
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


def safe_regularization(
    smallest: float, largest: float, regularization: Optional[float], dtype: torch.dtype
) -> float:
    r"""$\lambda_{\text{safe}}$ (see the module) from the extreme eigenvalues of the
    *regularized* matrix $C + \lambda I$, `smallest` $\le$ `largest`."""
    lam = regularization or 0.0
    mu_min, mu_max = smallest - lam, largest - lam
    kappa = max_condition_number(dtype)
    return max((max(mu_max, 0.0) - kappa * mu_min) / (kappa - 1.0), 0.0)


def report_ill_conditioning(
    method: str,
    kappa: float,
    safe: float,
    regularization: Optional[float],
    dtype: torch.dtype,
    on_nonconvergence: str,
    warn: bool = True,
    diagnostics: Optional[SolverDiagnostics] = None,
    where: str = "",
    detail: Optional[str] = None,
) -> bool:
    r"""Check the condition number `kappa` of $C + \lambda I$ against what `dtype` resolves.

    Returns True if the system is resolvable; otherwise raises an
    [IllConditionedError][influx.errors.IllConditionedError] (`on_nonconvergence="raise"`)
    naming $\lambda$ and `safe`, or logs the same message (a warning if `warn`, else at debug
    level) and returns False.

    Args:
        method: the solver, for the message.
        kappa: the estimated condition number of $C + \lambda I$.
        safe: the smallest safe $\lambda$ (see
            [safe_regularization][influx.torch.inverse.conditioning.safe_regularization]).
        regularization: $\lambda$ (None for none).
        dtype: the compute dtype.
        on_nonconvergence: `"raise"` or `"warn"`.
        warn: log at warning level (else debug) when not raising.
        diagnostics: attached to the error.
        where: a prefix for the message (e.g. the block).
        detail: what is wrong, instead of "has condition number ...".
    """
    limit = max_condition_number(dtype)
    if kappa <= limit:
        return True
    if detail is None:
        detail = f"has condition number {kappa:.3g} > {limit:.3g}, more than {dtype} resolves"
    message = (
        f"{where}{method}: C + λI with regularization={regularization!r} {detail}, so its "
        f"solution is not meaningful. Use regularization >= {safe:.3g} (the smallest safe "
        'value), or regularization="auto".'
    )
    if on_nonconvergence == "raise":
        raise IllConditionedError(message, diagnostics, regularization, safe)
    logger.log(logging.WARNING if warn else logging.DEBUG, "%s", message)
    return False


def check_solve_conditioning(
    method: str,
    result: IterativeSolution,
    diagnostics: Optional[SolverDiagnostics],
    regularization: Optional[float],
    dtype: torch.dtype,
    on_nonconvergence: str,
    warn: bool,
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
        detail = (
            f"is not positive definite: {method} met curvature p^T(C + λI)p <= 0 along a "
            f"search direction (smallest eigenvalue estimate {low:.3g}) and stopped"
        )
    report_ill_conditioning(
        method, kappa, safe, regularization, dtype, on_nonconvergence, warn, diagnostics,
        detail=detail,
    )  # fmt: skip
