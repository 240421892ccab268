r"""Iterative solvers for $(A + \lambda I)x = b$: conjugate gradient, block CG and LiSSA.

The solvers only need the *action* of the curvature matrix $A$ (a Hessian or a Gauss-Newton
matrix) on vectors, never the matrix itself. Right-hand sides are the **rows** of a tensor
`(N, P)`, and every function that applies a matrix maps rows to rows, as all operators of
influx do.

* [conjugate_gradient][influx.torch.iterative.conjugate_gradient] solves each right-hand side
  with its own (preconditioned) CG recurrence; all unconverged right-hand sides share one
  operator application per iteration.
* [block_conjugate_gradient][influx.torch.iterative.block_conjugate_gradient] solves all
  right-hand sides together in a common, growing Krylov space; it is breakdown-free, so it
  also works when there are more right-hand sides than parameters.
* [lissa][influx.torch.iterative.lissa] is the stochastic fixed-point iteration of Agarwal et
  al. (2017), one mini-batch per step.

The operators [CgOperator][influx.torch.iterative.CgOperator] and
[LissaOperator][influx.torch.iterative.LissaOperator] wrap them as
[TensorOperator][influx.torch.base.TensorOperator]s; they record what the solver achieved in
their `diagnostics` after each `apply`.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..types import SolverDiagnostics
from .base import TensorOperator, TorchBatch
from .batch_operation import BatchOperation
from .operator import iterate_batches
from .preconditioner import Preconditioner, check_preconditioner
from .util import validate_regularization

__all__ = [
    "IterativeSolution",
    "LissaDivergenceError",
    "conjugate_gradient",
    "block_conjugate_gradient",
    "lissa",
    "estimate_largest_eigenvalue",
    "CgOperator",
    "LissaOperator",
]

logger = logging.getLogger(__name__)

RowMap = Callable[[torch.Tensor], torch.Tensor]

AUTO_SCALE_FACTOR = 1.5
"""With `scale="auto"`, LiSSA's scale is this factor times the estimated largest eigenvalue of
$A_b + \\lambda I$ over a few batches $b$."""

AUTO_SCALE_BATCHES = 3
"""With `scale="auto"`, the number of batches on which the largest eigenvalue is estimated."""


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
    """

    solution: torch.Tensor
    iterations: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor

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


class LissaDivergenceError(ValueError):
    """Raised when the LiSSA iteration diverges (its scale is too small for the curvature)."""


def _check_positive(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Parameter '{name}' must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Parameter '{name}' must be a positive number, got {value}.")


def _check_non_negative(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Parameter '{name}' must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Parameter '{name}' must be a non-negative number, got {value}.")


def _check_maxiter(maxiter: Optional[int], allow_none: bool = True) -> None:
    if maxiter is None and allow_none:
        return
    if isinstance(maxiter, bool) or not isinstance(maxiter, int):
        raise TypeError(
            f"Parameter 'maxiter' must be a positive int{' or None' if allow_none else ''}, "
            f"got {type(maxiter).__name__}."
        )
    if maxiter <= 0:
        raise ValueError(f"Parameter 'maxiter' must be a positive int, got {maxiter}.")


def _validate_cg_settings(rtol: float, atol: float, maxiter: Optional[int]) -> None:
    _check_positive(rtol, "rtol")
    _check_non_negative(atol, "atol")
    _check_maxiter(maxiter)


def _validate_lissa_settings(
    maxiter: int, dampen: float, scale: Union[float, str], rtol: float
) -> None:
    _check_maxiter(maxiter, allow_none=False)
    _check_dampen(dampen)
    _check_positive(rtol, "rtol")
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(
                f"Parameter 'scale' must be a positive number or 'auto', got {scale!r}."
            )
    else:
        _check_positive(scale, "scale")


def _check_rhs(rhs: torch.Tensor) -> None:
    if not isinstance(rhs, torch.Tensor):
        raise TypeError(f"Parameter 'rhs' must be a torch.Tensor, got {type(rhs).__name__}.")
    if rhs.ndim != 2:
        raise ValueError(
            f"Parameter 'rhs' must have shape (N, P) (one right-hand side per row), got "
            f"{tuple(rhs.shape)}."
        )


def _check_finite(values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        raise ValueError(
            "The operator produced NaN or Inf: check the model's parameters, the data and the loss."
        )


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


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

    Args:
        apply: $V \mapsto V M^\top$ for rows `V` `(K, P)`; $M$ must be symmetric positive
            definite.
        rhs: the right-hand sides, one per row, `(N, P)`.
        rtol: relative tolerance on the residual norm, $> 0$.
        atol: absolute tolerance on the residual norm, $\ge 0$.
        maxiter: maximum number of iterations; None means $10 P$.
        preconditioner: $V \mapsto V P^{-\top}$ for rows, an approximation of $M^{-1}$.
        progress: show a progress bar over the iterations.

    Returns:
        The solutions with per right-hand side iterations, relative residuals and convergence.
    """
    _check_rhs(rhs)
    _validate_cg_settings(rtol, atol, maxiter)
    n, size = rhs.shape
    maxiter = 10 * size if maxiter is None else maxiter
    precondition = preconditioner if preconditioner is not None else (lambda v: v)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    b_norm = torch.linalg.norm(rhs, dim=1)
    tol = torch.clamp(rtol * b_norm, min=atol)
    r_norm = b_norm.clone()
    iterations = torch.zeros(n, dtype=torch.long, device=rhs.device)
    active = torch.nonzero(r_norm > tol).squeeze(1)
    if active.numel():
        z = precondition(r[active])
        direction = z
        rz = _row_dot(r[active], z)

    bar = tqdm(total=maxiter, desc="CG", disable=not progress, leave=False)
    for it in range(1, maxiter + 1):
        if active.numel() == 0:
            break
        bar.update(1)
        q = apply(direction)
        _check_finite(q)
        curvature = _row_dot(direction, q)
        breakdown = curvature == 0
        alpha = torch.where(breakdown, torch.zeros_like(curvature), rz / curvature)
        x_a = x[active] + alpha.unsqueeze(1) * direction
        r_a = r[active] - alpha.unsqueeze(1) * q
        x[active] = x_a
        r[active] = r_a
        norms = torch.linalg.norm(r_a, dim=1)
        r_norm[active] = norms
        iterations[active] = it
        keep = (norms > tol[active]) & ~breakdown
        if bool(breakdown.any()):
            logger.debug("CG: zero curvature (breakdown) for %d rows.", int(breakdown.sum()))
        r_k = r_a[keep]
        z = precondition(r_k)
        rz_new = _row_dot(r_k, z)
        direction = z + (rz_new / rz[keep]).unsqueeze(1) * direction[keep]
        rz = rz_new
        active = active[keep]
    bar.close()

    converged = r_norm <= tol
    residuals = torch.where(b_norm > 0, r_norm / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
    return IterativeSolution(x, iterations, residuals, converged)


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

    Args:
        apply: $V \mapsto V M^\top$ for rows `V` `(K, P)`; $M$ symmetric positive definite.
        rhs: the right-hand sides, one per row, `(N, P)`.
        rtol: relative tolerance on each residual norm, $> 0$.
        atol: absolute tolerance on each residual norm, $\ge 0$.
        maxiter: maximum number of iterations; None means $10 P$.
        preconditioner: $V \mapsto V P^{-\top}$ for rows, an approximation of $M^{-1}$.
        progress: show a progress bar over the iterations.

    Returns:
        The solutions with per right-hand side iterations, relative residuals and convergence.
    """
    _check_rhs(rhs)
    _validate_cg_settings(rtol, atol, maxiter)
    n, size = rhs.shape
    maxiter = 10 * size if maxiter is None else maxiter
    precondition = preconditioner if preconditioner is not None else (lambda v: v)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    b_norm = torch.linalg.norm(rhs, dim=1)
    tol = torch.clamp(rtol * b_norm, min=atol)
    r_norm = b_norm.clone()
    iterations = torch.zeros(n, dtype=torch.long, device=rhs.device)
    active = torch.nonzero(r_norm > tol).squeeze(1)
    directions = _orthonormal_rows(precondition(r[active])) if active.numel() else rhs[:0]

    best = float((r_norm / tol).max()) if n else 0.0
    since_best = 0
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
        _check_finite(q)
        gram = directions @ q.T  # S^T M S
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
    return IterativeSolution(x, iterations, residuals, converged)


def estimate_largest_eigenvalue(
    apply: RowMap,
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    num_vectors: int = 4,
    num_iterations: int = 20,
    generator: Optional[torch.Generator] = None,
) -> float:
    r"""Estimate the largest absolute eigenvalue of a symmetric matrix by block power iteration.

    Starting from `num_vectors` random orthonormal rows $V$, it repeats
    $V \leftarrow \operatorname{orth}(V M^\top)$ and returns the largest absolute eigenvalue
    of the Rayleigh quotient $V M V^\top$ (a lower bound of $|\lambda|_{\max}$ that is tight
    once the iteration has converged).

    Args:
        apply: $V \mapsto V M^\top$ for rows `V` `(K, P)`.
        size: $P$.
        dtype: dtype of the test vectors.
        device: device of the test vectors.
        num_vectors: the block size (at most $P$).
        num_iterations: the number of power iterations.
        generator: optional random generator, for reproducibility.
    """
    k = max(1, min(num_vectors, size))
    v = torch.randn(k, size, dtype=dtype, device=device, generator=generator)
    v = torch.linalg.qr(v.T)[0].T
    for _ in range(num_iterations):
        w = apply(v)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("The operator produced NaN or Inf during the power iteration.")
        if float(torch.linalg.norm(w)) == 0.0:
            return 0.0
        v = torch.linalg.qr(w.T)[0].T
    rayleigh = v @ apply(v).T
    return float(torch.linalg.eigvalsh((rayleigh + rayleigh.T) / 2).abs().max())


def lissa(
    apply_batch: Callable[[TorchBatch, torch.Tensor], torch.Tensor],
    batches: Iterator[TorchBatch],
    rhs: torch.Tensor,
    regularization: Optional[float] = None,
    maxiter: int = 1000,
    dampen: float = 0.0,
    scale: float = 10.0,
    rtol: float = 1e-4,
    progress: bool = False,
) -> IterativeSolution:
    r"""LiSSA: a stochastic fixed-point iteration for $x = (A + \lambda I)^{-1} b$.

    With one mini-batch $b_t$ per step (its curvature $A_{b_t}$ an unbiased estimate of $A$),
    a dampening $d$ and a scale $s$:

    $$
    h_0 = b, \qquad
    h_{t+1} = b + (1 - d)\, h_t - \frac{(A_{b_t} + \lambda I)\, h_t}{s}, \qquad
    x \approx \frac{h_T}{s} .
    $$

    With $d = 0$ this is the truncated Neumann series of $s (A + \lambda I)^{-1}$; it
    converges when every eigenvalue $\mu$ of $A_{b_t} + \lambda I$ satisfies
    $0 < \mu < 2s$. A right-hand side stops once its relative change
    $\|h_{t+1} - h_t\| / \|h_{t+1}\|$ falls below `rtol`.

    The iteration is declared divergent (and a
    [LissaDivergenceError][influx.torch.iterative.LissaDivergenceError] raised) when $h$
    becomes NaN or Inf, or when $\|h_t\| > 10\,(t+1)\,\|b\|$: as long as every step is a
    contraction or an isometry, $\|h_t\| \le (t+1)\|b\|$, so growth beyond that bound means
    that the scale is too small for the curvature.

    Args:
        apply_batch: $(b, V) \mapsto V A_b^\top$ for a batch and rows `V` `(K, P)`.
        batches: an endless iterator of batches.
        rhs: the right-hand sides, one per row, `(N, P)`.
        regularization: $\lambda \ge 0$, or None.
        maxiter: maximum number of iterations (batches).
        dampen: the dampening $d \in [0, 1)$.
        scale: the scale $s > 0$.
        rtol: tolerance on the relative change, $> 0$.
        progress: show a progress bar over the iterations.

    Returns:
        The solutions; `residuals` holds the last relative change of each right-hand side.

    Raises:
        LissaDivergenceError: if the iteration diverges.
    """
    _check_rhs(rhs)
    validate_regularization(regularization)
    _validate_lissa_settings(maxiter, dampen, scale, rtol)
    lam = regularization or 0.0
    n = rhs.shape[0]
    h = rhs.clone()
    b_norm = torch.linalg.norm(rhs, dim=1)
    change = torch.zeros(n, dtype=rhs.dtype, device=rhs.device)
    iterations = torch.zeros(n, dtype=torch.long, device=rhs.device)
    converged = b_norm == 0
    active = torch.nonzero(~converged).squeeze(1)

    for it in tqdm(range(1, maxiter + 1), desc="LiSSA", disable=not progress, leave=False):
        if active.numel() == 0:
            break
        batch = next(batches)
        h_a = h[active]
        b_a = rhs[active]
        curvature = apply_batch(batch, h_a) + lam * h_a
        h_new = b_a + (1.0 - dampen) * h_a - curvature / scale
        new_norm = torch.linalg.norm(h_new, dim=1)
        if not bool(torch.isfinite(new_norm).all()) or bool(
            (new_norm > 10.0 * (it + 1) * b_norm[active]).any()
        ):
            raise LissaDivergenceError(
                f"LiSSA diverged at iteration {it} with scale={scale:.4g}: the norm of the "
                f"iterate grew to {float(new_norm.max()):.3g} (right-hand side norm "
                f"{float(b_norm[active].max()):.3g}). Increase 'scale' so that it exceeds half "
                "the largest eigenvalue of the regularized curvature of every batch, or use "
                "scale='auto'."
            )
        rel = torch.linalg.norm(h_new - h_a, dim=1) / torch.clamp(
            new_norm, min=torch.finfo(rhs.dtype).tiny
        )
        h[active] = h_new
        change[active] = rel
        iterations[active] = it
        done = rel < rtol
        converged[active[done]] = True
        active = active[~done]

    return IterativeSolution(h / scale, iterations, change, converged)


def _check_dampen(dampen: float) -> None:
    if isinstance(dampen, bool) or not isinstance(dampen, (int, float)):
        raise TypeError(f"Parameter 'dampen' must be a float, got {type(dampen).__name__}.")
    if not 0 <= dampen < 1:
        raise ValueError(f"Parameter 'dampen' must be in [0, 1), got {dampen}.")


def _report_non_convergence(
    method: str, result: IterativeSolution, warn: bool, what: str, hint: str
) -> None:
    if result.all_converged:
        return
    level = logging.WARNING if warn else logging.DEBUG
    logger.log(
        level,
        "%s did not converge for %d of %d right-hand sides within %d iterations: achieved %s "
        "%.3g. %s",
        method,
        int((~result.converged).sum()),
        result.converged.numel(),
        result.max_iterations,
        what,
        result.max_residual,
        hint,
    )


def _diagnostics(method: str, result: IterativeSolution, **details: object) -> SolverDiagnostics:
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


class CgOperator(TensorOperator):
    r"""Applies $(A + \lambda I)^{-1}$ by (preconditioned) conjugate gradient.

    For every row $b$ of the input it solves $(A + \lambda I)x = b$ for a symmetric positive
    definite curvature operator $A$ (a [HessianOperator][influx.torch.operator.HessianOperator],
    a [GaussNewtonOperator][influx.torch.operator.GaussNewtonOperator], a
    [MatrixOperator][influx.torch.operator.MatrixOperator], ...), stopping when
    $\|b - (A + \lambda I)x\| \le \max(\text{rtol}\,\|b\|, \text{atol})$. Each iteration
    applies $A$ once to all unconverged right-hand sides (see
    [conjugate_gradient][influx.torch.iterative.conjugate_gradient] and
    [block_conjugate_gradient][influx.torch.iterative.block_conjugate_gradient]).

    After every `apply`, `diagnostics` holds a
    [SolverDiagnostics][influx.types.SolverDiagnostics] with method `"cg"` or `"block_cg"`,
    the iterations and relative residual (maxima over the right-hand sides), whether all
    converged, and per right-hand side figures in `details`.

    Args:
        operator: the curvature operator $A$ (without regularization).
        regularization: $\lambda \ge 0$, or None.
        rtol: relative tolerance on the residual norm, $> 0$.
        atol: absolute tolerance on the residual norm, $\ge 0$.
        maxiter: maximum number of iterations; None means $10 P$ for $P$ parameters.
        progress: show a progress bar over the iterations.
        preconditioner: an approximation of $(A + \lambda I)^{-1}$ that speeds up convergence.
            An unfitted preconditioner is fitted (a copy of it) to `operator` and
            `regularization`; a fitted one is used (a copy of it) with this operator's
            regularization.
        use_block_cg: solve all right-hand sides together with block CG, which shares the
            Krylov space between them.
        warn_on_max_iteration: log a warning with the achieved residual when the tolerance is
            not reached within `maxiter` iterations; if False, log it at debug level.
    """

    def __init__(
        self,
        operator: TensorOperator,
        regularization: Optional[float] = None,
        rtol: float = 1e-7,
        atol: float = 1e-7,
        maxiter: Optional[int] = None,
        progress: bool = False,
        preconditioner: Optional[Preconditioner] = None,
        use_block_cg: bool = False,
        warn_on_max_iteration: bool = True,
    ):
        if not isinstance(operator, TensorOperator):
            raise TypeError(
                f"Parameter 'operator' must be a TensorOperator, got {type(operator).__name__}."
            )
        validate_regularization(regularization)
        _validate_cg_settings(rtol, atol, maxiter)
        check_preconditioner(preconditioner)
        self.operator = operator
        self._regularization = regularization
        self.rtol = rtol
        self.atol = atol
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
        self.diagnostics: Optional[SolverDiagnostics] = None

    @property
    def input_size(self) -> int:
        return self.operator.input_size

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype

    def _regularized_apply(self, v: torch.Tensor) -> torch.Tensor:
        result = self.operator.apply(v)
        if self._regularization:
            result = result + self._regularization * v
        return result

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.dtype)
        solver = block_conjugate_gradient if self.use_block_cg else conjugate_gradient
        method = "block_cg" if self.use_block_cg else "cg"
        result = solver(
            self._regularized_apply,
            tensor,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=self.maxiter,
            preconditioner=None if self.preconditioner is None else self.preconditioner.solve,
            progress=self.progress,
        )
        maxiter = 10 * self.input_size if self.maxiter is None else self.maxiter
        self.diagnostics = _diagnostics(
            method,
            result,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=maxiter,
            preconditioner=None
            if self.preconditioner is None
            else type(self.preconditioner).__name__,
        )
        _report_non_convergence(
            "Block CG" if self.use_block_cg else "CG",
            result,
            self.warn_on_max_iteration,
            "relative residual",
            f"Tolerance: max(rtol*|b|, atol) with rtol={self.rtol:g}, atol={self.atol:g}, "
            f"maxiter={maxiter}; increase 'maxiter' or 'regularization', or use a preconditioner.",
        )
        return result.solution

    def with_regularization(self, regularization: Optional[float]) -> "CgOperator":
        """A new operator for another $\\lambda$, sharing the curvature operator and the
        preconditioner (refitted only if the preconditioner's fit depends on $\\lambda$)."""
        validate_regularization(regularization)
        return CgOperator(
            self.operator,
            regularization,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=self.maxiter,
            progress=self.progress,
            preconditioner=self.preconditioner,
            use_block_cg=self.use_block_cg,
            warn_on_max_iteration=self.warn_on_max_iteration,
        )


def _endless_batches(data: Iterable, device: torch.device) -> Iterator[TorchBatch]:
    """Iterate over `data` again and again (a fresh iterator per pass, so a shuffling sampler
    reshuffles)."""
    while True:
        empty = True
        for batch in iterate_batches(data, device):
            empty = False
            yield batch
        if empty:
            raise ValueError("Parameter 'data' yielded no batches.")


class LissaOperator(TensorOperator):
    r"""Applies $(A + \lambda I)^{-1}$ approximately by LiSSA, one mini-batch per iteration.

    Starting from $h_0 = b$, with the curvature $A_{b_t}$ of the $t$-th mini-batch (the data
    loader is iterated again and again, in its own order; every application starts a fresh
    pass, so the operator holds no iteration state and repeated applications agree):

    $$
    h_{t+1} = b + (1 - d)\, h_t - \frac{(A_{b_t} + \lambda I)\, h_t}{s}, \qquad
    (A + \lambda I)^{-1} b \approx \frac{h_T}{s},
    $$

    with dampening $d$ and scale $s$ (see [lissa][influx.torch.iterative.lissa]). The scale
    must exceed half the largest eigenvalue of $A_b + \lambda I$ for every batch, or the
    iteration diverges (a `ValueError` asking to increase `scale`); larger scales converge
    more slowly. With `scale="auto"`, the largest eigenvalue $\mu_{\max}$ of $A_b$ is
    estimated by block power iteration on the first 3 batches, and
    $s = 1.5\,(\mu_{\max} + \lambda)$, which keeps the iteration stable for batches whose
    largest eigenvalue is up to three times the estimate. The estimate is computed once, at
    construction, and reused by `with_regularization`.

    A right-hand side stops when its relative change falls below `rtol`; `diagnostics` report
    method `"lissa"`, the iterations, the largest last relative change as `residual`, and the
    scale used.

    Args:
        batch_operation: the curvature of one batch, e.g. a
            [HessianBatchOperation][influx.torch.batch_operation.HessianBatchOperation].
        data: the training data, an iterable of `(x, y)` batches (its sampler and collate
            function are respected).
        regularization: $\lambda \ge 0$, or None.
        maxiter: maximum number of iterations (batches).
        dampen: the dampening $d \in [0, 1)$.
        scale: the scale $s > 0$, or `"auto"`.
        rtol: tolerance on the relative change between iterations, $> 0$.
        progress: show a progress bar over the iterations.
        warn_on_max_iteration: log a warning with the achieved relative change when `rtol` is
            not reached within `maxiter` iterations; if False, log it at debug level.
    """

    def __init__(
        self,
        batch_operation: BatchOperation,
        data: DataLoader,
        regularization: Optional[float] = None,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: Union[float, str] = 10.0,
        rtol: float = 1e-4,
        progress: bool = False,
        warn_on_max_iteration: bool = True,
    ):
        if not isinstance(batch_operation, BatchOperation):
            raise TypeError(
                "Parameter 'batch_operation' must be a BatchOperation, got "
                f"{type(batch_operation).__name__}."
            )
        validate_regularization(regularization)
        _validate_lissa_settings(maxiter, dampen, scale, rtol)
        self.batch_operation = batch_operation
        self.data = data
        self._regularization = regularization
        self.maxiter = maxiter
        self.dampen = dampen
        self.rtol = rtol
        self.progress = progress
        self.warn_on_max_iteration = warn_on_max_iteration
        self.auto_scale = scale == "auto"
        self.largest_eigenvalue: Optional[float] = None
        """With `scale="auto"`: the estimated largest eigenvalue of the batch curvature."""
        if self.auto_scale:
            self.largest_eigenvalue = self._estimate_largest_eigenvalue()
        self.diagnostics: Optional[SolverDiagnostics] = None
        self._scale_value = float(scale) if not self.auto_scale else 0.0

    @property
    def scale(self) -> float:
        """The scale $s$ in use (computed from the eigenvalue estimate for `scale="auto"`)."""
        if self.auto_scale:
            assert self.largest_eigenvalue is not None
            return AUTO_SCALE_FACTOR * (self.largest_eigenvalue + (self._regularization or 0.0))
        return self._scale_value

    def _estimate_largest_eigenvalue(self) -> float:
        estimates = []
        for index, batch in enumerate(iterate_batches(self.data, self.device)):
            if index >= AUTO_SCALE_BATCHES:
                break
            estimates.append(
                estimate_largest_eigenvalue(
                    functools.partial(self.batch_operation.apply, batch),
                    self.input_size,
                    self.dtype,
                    self.device,
                )
            )
        if not estimates:
            raise ValueError("Parameter 'data' yielded no batches.")
        value = max(estimates)
        if value == 0.0:
            raise ValueError(
                "Parameter 'scale': 'auto' found a zero curvature on the first batches; pass a "
                "positive number instead."
            )
        logger.debug("LiSSA: estimated largest batch eigenvalue %.4g.", value)
        return value

    @property
    def input_size(self) -> int:
        return self.batch_operation.input_size

    @property
    def device(self) -> torch.device:
        return self.batch_operation.device

    @property
    def dtype(self) -> torch.dtype:
        return self.batch_operation.dtype

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.dtype)
        scale = self.scale
        # A fresh pass over the data per application: the operator keeps no iteration state,
        # so it can be pickled or used from several threads at any time.
        result = lissa(
            self.batch_operation.apply,
            _endless_batches(self.data, self.device),
            tensor,
            regularization=self._regularization,
            maxiter=self.maxiter,
            dampen=self.dampen,
            scale=scale,
            rtol=self.rtol,
            progress=self.progress,
        )
        self.diagnostics = _diagnostics(
            "lissa",
            result,
            rtol=self.rtol,
            maxiter=self.maxiter,
            scale=scale,
            dampen=self.dampen,
            residual_kind="relative change",
        )
        _report_non_convergence(
            "LiSSA",
            result,
            self.warn_on_max_iteration,
            "relative change",
            f"Tolerance rtol={self.rtol:g}, maxiter={self.maxiter}, scale={scale:.4g}; "
            "increase 'maxiter' or the batch size.",
        )
        return result.solution

    def with_regularization(self, regularization: Optional[float]) -> "LissaOperator":
        """A new operator for another $\\lambda$ on the same batch operation and data
        (an automatic scale is recomputed from the stored eigenvalue estimate)."""
        validate_regularization(regularization)
        new = copy.copy(self)
        new._regularization = regularization
        new.diagnostics = None
        return new
