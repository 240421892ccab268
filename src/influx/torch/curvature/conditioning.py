r"""What a solver may call solved: the condition number the compute dtype resolves.

The one check of every inverse method (direct solves, Kronecker-factored, low-rank,
conjugate gradient, LiSSA, inverse harmonic mean); it sits below them all.

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
from typing import Optional

import torch

from ...errors import IllConditionedError
from ...types import SolverDiagnostics

__all__ = [
    "block_prefix",
    "check_eigenvalue_conditioning",
    "condition_number",
    "max_condition_number",
    "report_ill_conditioning",
    "safe_regularization",
]

logger = logging.getLogger(__name__)


def max_condition_number(dtype: torch.dtype) -> float:
    r"""$\kappa_{\max} = 1 / (100\,\varepsilon)$ of `dtype`."""
    return 1.0 / (100.0 * torch.finfo(dtype).eps)


def condition_number(eigenvalues: torch.Tensor) -> float:
    r"""$\kappa = \max |\mu| / \min |\mu|$ over `eigenvalues` (inf if one is zero)."""
    magnitudes = eigenvalues.abs()
    bottom = float(magnitudes.min())
    return math.inf if bottom == 0 else float(magnitudes.max()) / bottom


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
            [safe_regularization][influx.torch.curvature.conditioning.safe_regularization]).
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


def block_prefix(block_name: Optional[str]) -> str:
    """The prefix of a message about the block `block_name` (empty for None)."""
    return "" if block_name is None else f"Block {block_name!r}: "


def check_eigenvalue_conditioning(
    method: str,
    eigenvalues: torch.Tensor,
    regularization: Optional[float],
    dtype: torch.dtype,
    on_nonconvergence: str,
    diagnostics: SolverDiagnostics,
    warn: bool = True,
    where: str = "",
) -> bool:
    r"""Check $C + \lambda I$ from its eigenvalues (exact, or estimates at hand).

    Sets `diagnostics.condition_number` to $\kappa$ of `eigenvalues` (see
    [condition_number][influx.torch.curvature.conditioning.condition_number]) and
    `diagnostics.details["safe_regularization"]`; beyond
    [max_condition_number][influx.torch.curvature.conditioning.max_condition_number] of `dtype`
    sets `diagnostics.converged = False` and reports per `on_nonconvergence` (see
    [report_ill_conditioning][influx.torch.curvature.conditioning.report_ill_conditioning]).

    Args:
        method: the solver, for the message.
        eigenvalues: the eigenvalues of the *regularized* matrix $C + \lambda I$ (any shape).
        regularization: $\lambda$ (None for none).
        dtype: the compute dtype.
        on_nonconvergence: `"raise"` or `"warn"`.
        diagnostics: completed in place, and attached to the error.
        warn: log at warning level (else debug) when not raising.
        where: a prefix for the message (e.g. the block or layer).

    Returns:
        Whether the system is resolvable in `dtype`.
    """
    eigenvalues = eigenvalues.detach().reshape(-1)
    if eigenvalues.numel() == 0:
        diagnostics.condition_number = 1.0
        return True
    kappa = condition_number(eigenvalues)
    safe = safe_regularization(
        float(eigenvalues.min()), float(eigenvalues.max()), regularization, dtype
    )
    diagnostics.condition_number = kappa
    diagnostics.details["safe_regularization"] = safe
    if kappa <= max_condition_number(dtype):
        return True
    diagnostics.converged = False
    return report_ill_conditioning(
        method, kappa, safe, regularization, dtype, on_nonconvergence, warn, diagnostics, where
    )
