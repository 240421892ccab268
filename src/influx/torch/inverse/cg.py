r"""Conjugate gradient for $(A + \lambda I)x = b$, per right-hand side or in blocks.

Solvers only need the *action* of the curvature matrix $A$ on the rows of a tensor `(N, P)`:

* [conjugate_gradient][influx.torch.inverse.cg.conjugate_gradient] solves each right-hand side with its
  own (preconditioned) CG recurrence; all unconverged right-hand sides share one operator
  application per iteration.
* [block_conjugate_gradient][influx.torch.inverse.cg.block_conjugate_gradient] solves all right-hand
  sides together in a common, growing Krylov space; it is breakdown-free, so it also works when
  there are more right-hand sides than parameters.

[CgOperator][influx.torch.inverse.cg.CgOperator] wraps them as an operator that records what the solver
achieved in its `diagnostics` after each `apply`.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, List, NamedTuple, Optional

from tqdm.auto import tqdm

import torch

from ..curvature.tensor_operator import ShiftedOperator, TensorOperator
from ..data.state import OperatorState, StateContext, restore_operator
from ..data.validation import (
    check_finite,
    check_nonconvergence_policy,
    check_rows,
    default_tolerance,
    validate_cg_settings,
    validate_regularization,
)
from .conditioning import block_prefix, cg_ritz_values, check_solve_conditioning, default_maxiter
from .preconditioner import Preconditioner, check_preconditioner
from .solution import IterativeSolution, diagnostics_of, report_non_convergence, row_dot

__all__ = ["conjugate_gradient", "block_conjugate_gradient", "CgOperator"]

logger = logging.getLogger(__name__)

RowMap = Callable[[torch.Tensor], torch.Tensor]


class _Start(NamedTuple):
    """The state both CG variants start from."""

    n: int
    maxiter: int
    precondition: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    r: torch.Tensor
    b_norm: torch.Tensor
    tol: torch.Tensor
    r_norm: torch.Tensor
    iterations: torch.Tensor
    active: torch.Tensor


def _start(
    rhs: torch.Tensor,
    rtol: float,
    atol: float,
    maxiter: Optional[int],
    preconditioner: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> _Start:
    r"""Validate the settings and set up $X_0 = 0$, $R_0 = B$, the per-row tolerances
    $\max(\text{rtol}\,\|b\|, \text{atol})$ and the rows not yet converged."""
    check_rows(rhs, "rhs")
    validate_cg_settings(rtol, atol, maxiter)
    n, size = rhs.shape
    b_norm = torch.linalg.norm(rhs, dim=1)
    tol = torch.clamp(rtol * b_norm, min=atol)
    return _Start(
        n=n,
        maxiter=default_maxiter(size) if maxiter is None else maxiter,
        precondition=preconditioner if preconditioner is not None else (lambda v: v),
        x=torch.zeros_like(rhs),
        r=rhs.clone(),
        b_norm=b_norm,
        tol=tol,
        r_norm=b_norm.clone(),
        iterations=torch.zeros(n, dtype=torch.long, device=rhs.device),
        active=torch.nonzero(b_norm > tol).squeeze(1),
    )


def conjugate_gradient(
    apply: RowMap,
    rhs: torch.Tensor,
    rtol: float = 1e-7,
    atol: float = 1e-7,
    maxiter: Optional[int] = None,
    preconditioner: Optional[RowMap] = None,
    progress: bool = False,
) -> IterativeSolution:
    r"""Preconditioned conjugate gradient, one independent recurrence per right-hand side.

    For each row $b$ of `rhs` it runs the CG recurrence for the symmetric positive definite
    system $M x = b$ (with $M$ given by `apply`, typically $A + \lambda I$), started at
    $x_0 = 0$:

    $$
    \alpha_k = \frac{r_k^\top z_k}{p_k^\top M p_k}, \quad x_{k+1} = x_k + \alpha_k p_k, \quad
    r_{k+1} = r_k - \alpha_k M p_k, \quad z_{k+1} = P^{-1} r_{k+1}, \quad
    p_{k+1} = z_{k+1} + \frac{r_{k+1}^\top z_{k+1}}{r_k^\top z_k} p_k ,
    $$

    with $P^{-1}$ the preconditioner (identity if None). A right-hand side stops as soon as
    $\|r_k\| \le \max(\text{rtol}\,\|b\|, \text{atol})$; the others continue, and all
    unconverged right-hand sides share one call of `apply` per iteration. The residual is the
    recursively updated one.

    A right-hand side whose search direction has $p_k^\top M p_k \le 0$ stops there (CG is
    only defined for a positive definite $M$), flagged in `negative_curvature`. The
    coefficients $\alpha_k, \beta_k$ define the Lanczos tridiagonal of each recurrence, whose
    extreme eigenvalues (Ritz values, see
    [cg_ritz_values][influx.torch.inverse.conditioning.cg_ritz_values]) estimate those of
    $M$ (of $P^{-1} M$ with a preconditioner) from the inside; with the Rayleigh quotients
    $p_k^\top M p_k / p_k^\top p_k$ they give `spectrum`.

    Args:
        apply: $V \mapsto V M^\top$ for rows `V` `(K, P)`; $M$ must be symmetric positive
            definite.
        rhs: the right-hand sides, one per row, `(N, P)`.
        rtol: relative tolerance on the residual norm, $> 0$.
        atol: absolute tolerance on the residual norm, $\ge 0$.
        maxiter: maximum number of iterations; None means $\min(10 P, 1000)$.
        preconditioner: $V \mapsto V P^{-\top}$ for rows, an approximation of $M^{-1}$.
        progress: show a progress bar over the iterations.

    Returns:
        The solutions with per right-hand side iterations, relative residuals and convergence.
    """
    n, maxiter, precondition, x, r, b_norm, tol, r_norm, iterations, active = _start(
        rhs, rtol, atol, maxiter, preconditioner
    )
    if active.numel():
        z = precondition(r[active])
        direction = z
        rz = row_dot(r[active], z)

    negative = torch.zeros(n, dtype=torch.bool, device=rhs.device)
    alphas: List[List[float]] = [[] for _ in range(n)]
    betas: List[List[float]] = [[] for _ in range(n)]
    rayleigh = [math.inf, -math.inf]
    bar = tqdm(total=maxiter, desc="CG", disable=not progress, leave=False)
    for it in range(1, maxiter + 1):
        if active.numel() == 0:
            break
        bar.update(1)
        q = apply(direction)
        check_finite(q, "operator's products")
        curvature = row_dot(direction, q)
        quotients = curvature / row_dot(direction, direction)
        rayleigh = [
            min(rayleigh[0], float(quotients.min())),
            max(rayleigh[1], float(quotients.max())),
        ]
        breakdown = curvature <= 0
        negative[active[breakdown]] = True
        alpha = torch.where(breakdown, torch.zeros_like(curvature), rz / curvature)
        for row, value in zip(active.tolist(), alpha.tolist()):
            if value > 0:
                alphas[row].append(value)
        x_a = x[active] + alpha.unsqueeze(1) * direction
        r_a = r[active] - alpha.unsqueeze(1) * q
        x[active] = x_a
        r[active] = r_a
        norms = torch.linalg.norm(r_a, dim=1)
        r_norm[active] = norms
        iterations[active] = it
        keep = (norms > tol[active]) & ~breakdown
        if bool(breakdown.any()):
            logger.debug("CG: curvature <= 0 (breakdown) for %d rows.", int(breakdown.sum()))
        r_k = r_a[keep]
        z = precondition(r_k)
        rz_new = row_dot(r_k, z)
        for row, value in zip(active[keep].tolist(), (rz_new / rz[keep]).tolist()):
            betas[row].append(value)
        direction = z + (rz_new / rz[keep]).unsqueeze(1) * direction[keep]
        rz = rz_new
        active = active[keep]
    bar.close()

    converged = (r_norm <= tol) & ~negative
    residuals = torch.where(b_norm > 0, r_norm / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
    spectrum = None
    if math.isfinite(rayleigh[0]):
        # Ritz values of P^{-1} M are no bounds of M's spectrum: only the Rayleigh quotients
        # are used with a preconditioner.
        ritz = [cg_ritz_values(a, b) for a, b in zip(alphas, betas) if a and preconditioner is None]
        low = min([rayleigh[0], *(r[0] for r in ritz)])
        high = max([rayleigh[1], *(r[1] for r in ritz)])
        spectrum = (low, high)
    return IterativeSolution(x, iterations, residuals, converged, spectrum, negative)


_RESTART_AFTER = 10
"""Block CG restarts from the true residual after this many iterations in which the largest
residual (relative to its tolerance) has not decreased by at least 1%."""


def _orthonormal_rows(w: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (as rows) of the row space of `w`, dropping dependent rows.

    Rows are normalised first so that the numerical rank decision does not depend on their
    scale; singular values below `sqrt(eps) * s_max` are treated as zero (a looser threshold
    keeps noise directions that cost the block its conjugacy). A thin SVD costs
    $O(K^2 P)$ for `K` rows.
    """
    norms = torch.linalg.norm(w, dim=1)
    w = w[norms > 0] / norms[norms > 0].unsqueeze(1)
    if w.shape[0] == 0:
        return w
    _, singular, vh = torch.linalg.svd(w, full_matrices=False)
    threshold = math.sqrt(torch.finfo(w.dtype).eps) * singular[0]
    return vh[singular > threshold]


def _solve_gram(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve `gram @ X = rhs` for a small symmetric (ideally positive definite) matrix."""
    gram = (gram + gram.T) / 2
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.pinv(gram, hermitian=True) @ rhs


def block_conjugate_gradient(
    apply: RowMap,
    rhs: torch.Tensor,
    rtol: float = 1e-7,
    atol: float = 1e-7,
    maxiter: Optional[int] = None,
    preconditioner: Optional[RowMap] = None,
    progress: bool = False,
) -> IterativeSolution:
    r"""Breakdown-free preconditioned block conjugate gradient for all right-hand sides at once.

    Writing the right-hand sides as the columns of $B$ and the search directions as the
    columns of a matrix $S_k$ with orthonormal columns (Ji and Li, 2017):

    $$
    \begin{aligned}
    \alpha_k &= (S_k^\top M S_k)^{-1} S_k^\top R_k, &
    X_{k+1} &= X_k + S_k \alpha_k, \quad R_{k+1} = R_k - M S_k \alpha_k, \\
    Z_{k+1} &= P^{-1} R_{k+1}, &
    S_{k+1} &= \operatorname{orth}\!\left(Z_{k+1} - S_k (S_k^\top M S_k)^{-1}
    (M S_k)^\top Z_{k+1}\right).
    \end{aligned}
    $$

    $\operatorname{orth}$ re-orthonormalises the new directions and drops those that are
    numerically dependent (rank-revealing SVD), which is what keeps the method from breaking
    down when residuals become linearly dependent, e.g. with more right-hand sides than
    parameters. A right-hand side whose residual satisfies
    $\|r\| \le \max(\text{rtol}\,\|b\|, \text{atol})$ is dropped from the block; the search
    space then comes from the remaining residuals only. Each iteration costs one call of
    `apply` on at most $\min(N, P)$ rows. When rounding errors make the iteration stagnate
    (the largest residual relative to its tolerance has not decreased by 1% in 10
    iterations), it restarts from the true residual $B - M X$ (one extra call of `apply`).

    The extreme eigenvalues of every $S_k^\top M S_k$ (Ritz values of $M$) estimate those of
    $M$ from the inside, returned as `spectrum`.

    Args:
        apply: $V \mapsto V M^\top$ for rows `V` `(K, P)`; $M$ symmetric positive definite.
        rhs: the right-hand sides, one per row, `(N, P)`.
        rtol: relative tolerance on each residual norm, $> 0$.
        atol: absolute tolerance on each residual norm, $\ge 0$.
        maxiter: maximum number of iterations; None means $\min(10 P, 1000)$.
        preconditioner: $V \mapsto V P^{-\top}$ for rows, an approximation of $M^{-1}$.
        progress: show a progress bar over the iterations.

    Returns:
        The solutions with per right-hand side iterations, relative residuals and convergence.
    """
    n, maxiter, precondition, x, r, b_norm, tol, r_norm, iterations, active = _start(
        rhs, rtol, atol, maxiter, preconditioner
    )
    directions = _orthonormal_rows(precondition(r[active])) if active.numel() else rhs[:0]

    best = float((r_norm / tol).max()) if n else 0.0
    since_best = 0
    low, high = math.inf, -math.inf
    bar = tqdm(total=maxiter, desc="block CG", disable=not progress, leave=False)
    for it in range(1, maxiter + 1):
        if active.numel() == 0:
            break
        if directions.shape[0] == 0 or since_best >= _RESTART_AFTER:
            # Restart from the true residual: rounding has cost the directions their
            # conjugacy (the residual has stagnated), or no independent direction is left.
            r_a = rhs[active] - apply(x[active])
            r[active] = r_a
            directions = _orthonormal_rows(precondition(r_a))
            since_best = 0
            if directions.shape[0] == 0:
                break
        bar.update(1)
        q = apply(directions)  # rows: M s_i
        check_finite(q, "operator's products")
        gram = directions @ q.T  # S^T M S
        ritz = torch.linalg.eigvalsh((gram + gram.T) / 2)
        low, high = min(low, float(ritz[0])), max(high, float(ritz[-1]))
        r_a = r[active]
        alpha = _solve_gram(gram, directions @ r_a.T)  # (s, k)
        x[active] = x[active] + alpha.T @ directions
        r_a = r_a - alpha.T @ q
        r[active] = r_a
        norms = torch.linalg.norm(r_a, dim=1)
        r_norm[active] = norms
        iterations[active] = it
        keep = norms > tol[active]
        active = active[keep]
        if active.numel() == 0:
            break
        current = float((norms[keep] / tol[active]).max())
        if current < 0.99 * best:
            best, since_best = current, 0
        else:
            since_best += 1
        z = precondition(r_a[keep])
        # Make the new directions M-conjugate to the current ones; a second pass restores
        # the conjugacy lost to rounding ("twice is enough").
        w = z
        for _ in range(2):
            w = w - _solve_gram(gram, q @ w.T).T @ directions
        directions = _orthonormal_rows(w)
    bar.close()

    converged = r_norm <= tol
    residuals = torch.where(b_norm > 0, r_norm / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
    spectrum = (low, high) if math.isfinite(low) else None
    return IterativeSolution(x, iterations, residuals, converged, spectrum)


class CgOperator(TensorOperator):
    r"""Applies $(A + \lambda I)^{-1}$ by (preconditioned) conjugate gradient.

    For every row $b$ of the input it solves $(A + \lambda I)x = b$ for a symmetric positive
    definite curvature operator $A$ (a [HessianOperator][influx.torch.curvature.operators.HessianOperator],
    a [GaussNewtonOperator][influx.torch.curvature.operators.GaussNewtonOperator], a
    [MatrixOperator][influx.torch.curvature.tensor_operator.MatrixOperator], ...), stopping when
    $\|b - (A + \lambda I)x\| \le \max(\text{rtol}\,\|b\|, \text{atol})$. Each iteration
    applies $A$ once to all unconverged right-hand sides (see
    [conjugate_gradient][influx.torch.inverse.cg.conjugate_gradient] and
    [block_conjugate_gradient][influx.torch.inverse.cg.block_conjugate_gradient]).

    After every `apply`, `diagnostics` holds a
    [SolverDiagnostics][influx.types.SolverDiagnostics] with method `"cg"` or `"block_cg"`,
    the iterations and relative residual (maxima over the right-hand sides), whether all
    converged, and per right-hand side figures in `details`.

    Args:
        operator: the curvature operator $A$ (without regularization).
        regularization: $\lambda \ge 0$, or None.
        rtol: relative tolerance on the residual norm, $> 0$.
        atol: absolute tolerance on the residual norm, $\ge 0$.
        maxiter: maximum number of iterations; None means $\min(10 P, 1000)$ for $P$
            parameters.
        progress: show a progress bar over the iterations.
        preconditioner: an approximation of $(A + \lambda I)^{-1}$ that speeds up convergence.
            An unfitted preconditioner is fitted (a copy of it) to `operator` and
            `regularization`; a fitted one is used (a copy of it) with this operator's
            regularization.
        use_block_cg: solve all right-hand sides together with block CG, which shares the
            Krylov space between them.
        warn_on_max_iteration: log a warning with the achieved residual when the tolerance is
            not reached within `maxiter` iterations; if False, log it at debug level.
        on_nonconvergence: `"warn"` (log as above and return the approximate solution) or
            `"raise"` (raise a [NonConvergenceError][influx.errors.NonConvergenceError]
            carrying the diagnostics).
        block_name: named in the messages about conditioning (an influence model's block).

    `rtol` and `atol` of None mean $10^{-7}$, or ten times the machine epsilon of the
    operator's dtype if that is larger (a float32 solve cannot reach $10^{-7}$).
    """

    def _reference(self) -> Any:
        return self.operator

    def __init__(
        self,
        operator: TensorOperator,
        regularization: Optional[float] = None,
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
        maxiter: Optional[int] = None,
        progress: bool = False,
        preconditioner: Optional[Preconditioner] = None,
        use_block_cg: bool = False,
        warn_on_max_iteration: bool = True,
        on_nonconvergence: str = "warn",
        block_name: Optional[str] = None,
    ):
        if not isinstance(operator, TensorOperator):
            raise TypeError(
                f"Parameter 'operator' must be a TensorOperator, got {type(operator).__name__}."
            )
        validate_regularization(regularization)
        validate_cg_settings(rtol, atol, maxiter)
        check_preconditioner(preconditioner)
        self.operator = operator
        self._regularization = regularization
        self.on_nonconvergence = check_nonconvergence_policy(on_nonconvergence)
        self.block_name = block_name
        self.rtol = default_tolerance(rtol, operator.dtype, 1e-7)
        self.atol = default_tolerance(atol, operator.dtype, 1e-7)
        self.maxiter = maxiter
        self.progress = progress
        self.use_block_cg = use_block_cg
        self.warn_on_max_iteration = warn_on_max_iteration
        self.preconditioner: Optional[Preconditioner] = None
        if preconditioner is not None:
            if preconditioner.is_fitted:
                self.preconditioner = preconditioner.with_regularization(regularization)
            else:
                self.preconditioner = copy.copy(preconditioner).fit(operator, regularization)
        self.diagnostics = None

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.dtype)
        solver = block_conjugate_gradient if self.use_block_cg else conjugate_gradient
        method = "block_cg" if self.use_block_cg else "cg"
        result = solver(
            ShiftedOperator(self.operator, self._regularization).apply,
            tensor,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=self.maxiter,
            preconditioner=None if self.preconditioner is None else self.preconditioner.solve,
            progress=self.progress,
        )
        maxiter = default_maxiter(self.input_size) if self.maxiter is None else self.maxiter
        self.diagnostics = diagnostics_of(
            method,
            result,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=maxiter,
            preconditioner=None
            if self.preconditioner is None
            else type(self.preconditioner).__name__,
        )
        check_solve_conditioning(
            "block CG" if self.use_block_cg else "CG", result, self.diagnostics, self._regularization, self.dtype,
            self.on_nonconvergence, self.warn_on_max_iteration,
            block_prefix(getattr(self, "block_name", None)),
        )  # fmt: skip
        report_non_convergence(
            "Block CG" if self.use_block_cg else "CG",
            result,
            self.warn_on_max_iteration,
            "relative residual",
            f"Tolerance: max(rtol*|b|, atol) with rtol={self.rtol:g}, atol={self.atol:g}, "
            f"maxiter={maxiter}; increase 'maxiter' or 'regularization', or use a preconditioner.",
            self.on_nonconvergence,
            self.diagnostics,
        )
        return result.solution

    def _regularization_changed(self) -> None:
        # The preconditioner is refitted only if its fit depends on the regularization.
        if self.preconditioner is not None:
            self.preconditioner = self.preconditioner.with_regularization(self._regularization)
        self.diagnostics = None

    def export_state(self) -> OperatorState:
        children = {"operator": self.operator.export_state()}
        if self.preconditioner is not None:
            children["preconditioner"] = self.preconditioner.export_state()
        return OperatorState(
            "CgOperator",
            settings={
                "regularization": self._regularization,
                "rtol": self.rtol,
                "atol": self.atol,
                "maxiter": self.maxiter,
                "progress": self.progress,
                "use_block_cg": self.use_block_cg,
                "warn_on_max_iteration": self.warn_on_max_iteration,
                "on_nonconvergence": self.on_nonconvergence,
            },
            children=children,
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "CgOperator":
        settings = dict(state.settings)
        operator = restore_operator(state.children["operator"], context)
        preconditioner = None
        if "preconditioner" in state.children:
            preconditioner = restore_operator(state.children["preconditioner"], context)
        return cls(
            operator, settings.pop("regularization"), preconditioner=preconditioner, **settings
        )
