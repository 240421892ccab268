r"""Low-rank approximations of curvature operators, from matrix-vector products only.

A symmetric curvature matrix $C$ (Hessian or Gauss-Newton matrix of a block) is approximated
by a few eigenpairs, $C \approx V D V^\top$ with $V$ `(P, r)` orthonormal and $D$ diagonal:

* [lanczos_eigenpairs][influx.torch.inverse.low_rank_approximation.lanczos_eigenpairs]: the $r$
  eigenpairs of largest magnitude by the thick-restart Lanczos method (the symmetric form of
  the implicitly restarted Arnoldi method), with full reorthogonalisation, entirely in torch on
  the operator's device;
* [nystroem_low_rank][influx.torch.inverse.low_rank_approximation.nystroem_low_rank]: a
  randomized Nyström sketch, one application of $C$ to $r$ vectors, for positive semi-definite
  $C$.

The inverse they give is [LowRankOperator][influx.torch.inverse.low_rank.LowRankOperator].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import torch

from ...types import SolverDiagnostics
from ..autodiff.derivatives import LossOrTask
from ..curvature.operators import SecondOrderMode, curvature_operator
from ..curvature.tensor_operator import TensorOperator
from .sketch import LowRankProductRepresentation, nystroem_sketch

__all__ = [
    "LowRankApproximation",
    "default_krylov_dimension",
    "lanczos_eigenpairs",
    "lanczos_low_rank",
    "model_hessian_low_rank",
    "model_hessian_nystroem_approximation",
    "nystroem_low_rank",
    "validate_rank",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowRankApproximation:
    """A low-rank approximation $V D V^\\top$ and what its computation reported.

    Attributes:
        representation: the eigenvalues $D$ (by decreasing magnitude) and the orthonormal
            eigenvectors $V$ `(P, r)`.
        diagnostics: method, number of operator applications, achieved eigen-residual,
            convergence and further figures in `details`.
    """

    representation: LowRankProductRepresentation
    diagnostics: SolverDiagnostics


def validate_rank(rank: int, input_dim: int, block_name: Optional[str] = None) -> int:
    r"""Check that `rank` is a positive int and clip it to `input_dim`.

    A rank larger than the number of parameters $P$ (of a block) is clipped to $P$ with a
    logged warning: at rank $P$ the approximation is complete.

    Returns:
        $\min(\text{rank}, P)$.

    Raises:
        TypeError: if `rank` is not an int.
        ValueError: if it is smaller than 1; the message gives the number of parameters.
    """
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"Parameter 'rank' must be an int, got {type(rank).__name__}.")
    where = f" of block {block_name!r}" if block_name is not None else ""
    if rank < 1:
        raise ValueError(
            f"Parameter 'rank' must be in [1, P] with P = {input_dim} the number of "
            f"parameters{where}, got {rank}."
        )
    if rank > input_dim:
        logger.warning(
            "Parameter 'rank' (%d) exceeds the number of parameters%s (%d): using rank %d.",
            rank,
            where,
            input_dim,
            input_dim,
        )
        return input_dim
    return rank


def default_krylov_dimension(rank: int, input_dim: int) -> int:
    """$\\min(P, \\max(2r + 1, 20))$, the default size of the Lanczos basis."""
    return min(input_dim, max(2 * rank + 1, 20))


def _check_krylov_dimension(krylov_dimension: int, rank: int, input_dim: int) -> None:
    if isinstance(krylov_dimension, bool) or not isinstance(krylov_dimension, int):
        raise TypeError(
            "Parameter 'krylov_dimension' must be an int or None, got "
            f"{type(krylov_dimension).__name__}."
        )
    if krylov_dimension > input_dim or (krylov_dimension <= rank and krylov_dimension != input_dim):
        raise ValueError(
            f"Parameter 'krylov_dimension' must be in [rank + 1, P] = [{rank + 1}, {input_dim}] "
            f"(or equal to P = {input_dim}), got {krylov_dimension}."
        )


def _orthonormal_block(
    w: torch.Tensor,
    basis: torch.Tensor,
    threshold: float,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """Orthonormal rows spanning the rows of `w` `(b, P)`, orthogonal to the rows of `basis`.

    Directions of `w` with a norm below `threshold` (an invariant subspace was found) are
    replaced by random directions.
    """
    q, r = torch.linalg.qr(w.T)
    deficient = r.diagonal().abs() <= threshold
    if bool(deficient.any()):
        q[:, deficient] = torch.randn(
            q.shape[0], int(deficient.sum()), dtype=q.dtype, device=q.device, generator=generator
        )
    q = q.T
    for _ in range(2):
        q = q - (q @ basis.T) @ basis
        q, _ = torch.linalg.qr(q.T)
        q = q.T
    return q


def lanczos_eigenpairs(
    mat_mat_prod: Callable[[torch.Tensor], torch.Tensor],
    input_dim: int,
    rank: int,
    krylov_dimension: Optional[int] = None,
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    block_size: Optional[int] = None,
) -> LowRankApproximation:
    r"""The `rank` eigenpairs of largest magnitude of a symmetric linear map.

    Thick-restart block Lanczos with full reorthogonalisation: an orthonormal basis $V$ of a
    Krylov space of dimension at most $m$ = `krylov_dimension` is built `block_size` vectors
    at a time (one call of `mat_mat_prod` per block), together with the projected matrix
    $T = V^\top A V$. The Ritz pairs $(\theta_i, V s_i)$ of $T$ have residuals
    $\|A V s_i - \theta_i V s_i\| = \|R^\top s_i^{\text{last}}\|$, with $R$ the part of the
    last block's image outside the basis. While the wanted pairs (largest $|\theta_i|$) do not
    satisfy $\|A V s_i - \theta_i V s_i\| \le \text{tol}\cdot|\theta_i|$, the basis is
    restarted from the best Ritz vectors and the orthonormalised $R$, which is mathematically
    equivalent to an implicit restart of the Arnoldi method. Invariant subspaces (e.g. a
    repeated eigenvalue $0$) are handled by continuing with random orthogonal directions.

    Args:
        mat_mat_prod: $X \mapsto X A$ for the rows of `X` `(K, P)` ($A$ symmetric).
        input_dim: $P$.
        rank: $r$, the number of eigenpairs, in $[1, P]$.
        krylov_dimension: $m$, the maximal size of the basis, in $[r + 1, P]$ or equal to $P$;
            None means $\min(P, \max(2r + 1, 20))$. Memory is $O(mP)$.
        tol: relative tolerance on the eigen-residuals (eigenvalues that are zero to working
            precision are converged at the rounding level of $\|A\|$ instead).
        max_iter: the maximum number of restarts; None means $10 P$.
        dtype: the dtype of the basis (the operator's dtype).
        device: the device of the basis (the operator's device).
        generator: random generator for the starting block, for reproducibility.
        progress: show a progress bar over operator applications.
        block_size: vectors per call of `mat_mat_prod`, at most $\lfloor (m - r)/2 \rfloor$
            when $m < P$. None chooses $\min(16, P)$ when $m = P$ (the whole space, no
            restart: blocks amortise the cost of a pass over the data) and $1$ otherwise
            (restarted blocks need more operator applications for the same accuracy).

    Returns:
        The eigenpairs by decreasing magnitude and
        [SolverDiagnostics][influx.types.SolverDiagnostics] with method `"lanczos"`,
        `iterations` the number of vectors $A$ was applied to, `residual` the largest
        relative eigen-residual $\|A v_i - \theta_i v_i\| / |\theta_i|$, and in `details`
        the rank, Krylov dimension, block size, calls of `mat_mat_prod`, restarts, per-pair
        residuals and the eigenvalue range.
    """
    rank = validate_rank(rank, input_dim)
    m = default_krylov_dimension(rank, input_dim) if krylov_dimension is None else krylov_dimension
    _check_krylov_dimension(m, rank, input_dim)
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"Parameter 'tol' must be a positive number, got {tol!r}.")
    max_restarts = 10 * input_dim if max_iter is None else max_iter
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(
            f"Parameter 'max_iter' must be a non-negative int or None, got {max_iter!r}."
        )
    full_space = m == input_dim
    largest_block = input_dim if full_space else max(1, (m - rank) // 2)
    if block_size is None:
        block_size = min(16, input_dim) if full_space else 1
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(
            f"Parameter 'block_size' must be an int or None, got {type(block_size).__name__}."
        )
    if not 1 <= block_size <= largest_block:
        raise ValueError(
            f"Parameter 'block_size' must be in [1, {largest_block}] for rank {rank} and "
            f"krylov_dimension {m}, got {block_size}."
        )
    b = block_size

    eps = torch.finfo(dtype).eps
    basis = torch.zeros(m, input_dim, dtype=dtype, device=device)
    projected = torch.zeros(m, m, dtype=dtype, device=device)
    start = torch.randn(b, input_dim, dtype=dtype, device=device, generator=generator)
    basis[:b] = _orthonormal_block(start, basis[:0], 0.0, generator)
    filled, multiplied = b, 0
    norm_estimate = 0.0
    applications, calls, restarts = 0, 0, 0

    bar = tqdm(desc="Lanczos", unit="vector", disable=not progress, leave=False)
    try:
        while True:
            while True:
                block = basis[multiplied:filled]
                image = mat_mat_prod(block)
                if not bool(torch.isfinite(image).all()):
                    raise ValueError(
                        "The operator returned NaN or Inf in Lanczos (after "
                        f"{applications} products): check the model, the loss and the data."
                    )
                calls += 1
                applications += block.shape[0]
                bar.update(block.shape[0])
                norm_estimate = max(norm_estimate, float(torch.linalg.norm(image, dim=1).max()))
                coefficients = image @ basis[:filled].T
                image = image - coefficients @ basis[:filled]
                correction = image @ basis[:filled].T
                image = image - correction @ basis[:filled]
                coefficients = coefficients + correction
                projected[multiplied:filled, :filled] = coefficients
                projected[:filled, multiplied:filled] = coefficients.T
                last = (multiplied, filled)
                multiplied = filled
                threshold = math.sqrt(eps) * norm_estimate
                width = image.shape[0]
                if filled + width <= m or (full_space and filled < m):
                    new = _orthonormal_block(image, basis[:filled], threshold, generator)
                    count = min(width, m - filled)
                    basis[filled : filled + count] = new[:count]
                    filled += count
                else:
                    residual_block = image
                    break
            size = filled
            theta, ritz = torch.linalg.eigh(projected[:size, :size])
            order = torch.argsort(theta.abs(), descending=True)
            wanted = order[:rank]
            if full_space and size == input_dim:
                residual_block = torch.zeros_like(residual_block)
            bounds = torch.linalg.norm(ritz[last[0] : last[1], wanted].T @ residual_block, dim=1)
            spectral_norm = float(theta.abs().max())
            floor = 10.0 * math.sqrt(m) * eps * max(spectral_norm, norm_estimate)
            thresholds = torch.clamp(tol * theta[wanted].abs(), min=floor)
            converged = bool((bounds <= thresholds).all())
            if converged or restarts >= max_restarts:
                break
            keep = rank + (size - rank) // 2
            keep = size - b * max(1, (size - keep) // b)
            kept = order[:keep]
            basis[:keep] = ritz[:, kept].T @ basis[:size]
            projected.zero_()
            projected[:keep, :keep] = torch.diag(theta[kept])
            threshold = math.sqrt(eps) * norm_estimate
            basis[keep : keep + b] = _orthonormal_block(
                residual_block, basis[:keep], threshold, generator
            )
            multiplied, filled = keep, keep + b
            restarts += 1
    finally:
        bar.close()

    eigen_vals = theta[wanted]
    eigen_vecs = (ritz[:, wanted].T @ basis[:size]).T
    relative = bounds / torch.clamp(eigen_vals.abs(), min=floor)
    max_residual = float(relative.max())
    if not converged:
        logger.warning(
            "Lanczos did not converge in %d restarts (%d operator applications): largest "
            "relative eigen-residual %.3g > tol %.3g. Increase 'max_iter' or "
            "'krylov_dimension'.",
            restarts,
            applications,
            max_residual,
            tol,
        )
    diagnostics = SolverDiagnostics(
        method="lanczos",
        converged=converged,
        iterations=applications,
        residual=max_residual,
        details={
            "rank": rank,
            "krylov_dimension": m,
            "block_size": b,
            "calls": calls,
            "restarts": restarts,
            "tol": tol,
            "residuals": relative.tolist(),
            "eigenvalue_range": (float(eigen_vals.min()), float(eigen_vals.max())),
        },
    )
    return LowRankApproximation(LowRankProductRepresentation(eigen_vals, eigen_vecs), diagnostics)


def lanczos_low_rank(
    operator: TensorOperator,
    rank: int,
    krylov_dimension: Optional[int] = None,
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> LowRankApproximation:
    """The `rank` eigenpairs of largest magnitude of a symmetric operator (e.g. a
    [HessianOperator][influx.torch.curvature.operators.HessianOperator]), on the operator's device.

    See [lanczos_eigenpairs][influx.torch.inverse.low_rank_approximation.lanczos_eigenpairs] for the method and the
    parameters.
    """
    return lanczos_eigenpairs(
        operator.apply,
        operator.input_size,
        rank,
        krylov_dimension=krylov_dimension,
        tol=tol,
        max_iter=max_iter,
        dtype=operator.dtype,
        device=operator.device,
        generator=generator,
        progress=progress,
    )


def nystroem_low_rank(
    operator: TensorOperator,
    rank: int,
    generator: Optional[torch.Generator] = None,
    shift_func: Optional[Callable[[torch.Tensor], Union[torch.Tensor, float]]] = None,
) -> LowRankApproximation:
    r"""Randomized Nyström approximation of a positive semi-definite operator.

    One application of the operator to `rank` vectors; see
    [randomized_nystroem_approximation][influx.torch.inverse.sketch.randomized_nystroem_approximation].
    Exact at `rank` $= P$ and for operators of rank at most `rank`. Negative curvature along
    the sketch is logged as a warning and reported in `diagnostics.details`.

    Args:
        operator: a symmetric positive semi-definite operator, e.g. a
            [GaussNewtonOperator][influx.torch.curvature.operators.GaussNewtonOperator].
        rank: the sketch size $r \ge 1$ (clipped to $P$ with a warning).
        generator: random generator for the test matrix, for reproducibility.
        shift_func: $Y \mapsto \nu$, the stabilising shift of the sketch (None: the default
            of [randomized_nystroem_approximation][influx.torch.inverse.sketch.randomized_nystroem_approximation]).
    """
    rank = validate_rank(rank, operator.input_size)
    representation, smallest = nystroem_sketch(
        lambda x: operator.apply(x.T).T,
        operator.input_size,
        rank,
        operator.dtype,
        operator.device,
        generator,
        shift_func,
    )
    eigen_vals = representation.eigen_vals
    diagnostics = SolverDiagnostics(
        method="nystroem",
        converged=True,
        iterations=1,
        residual=None,
        details={
            "rank": rank,
            "eigenvalue_range": (
                (float(eigen_vals.min()), float(eigen_vals.max())) if eigen_vals.numel() else None
            ),
            "negative_curvature": smallest < 0 and eigen_vals.numel() < rank,
            "smallest_sketch_eigenvalue": smallest,
        },
    )
    return LowRankApproximation(representation, diagnostics)


def model_hessian_low_rank(
    model: torch.nn.Module,
    loss: LossOrTask,
    training_data: DataLoader,
    rank: int = 10,
    krylov_dimension: Optional[int] = None,
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
    progress: bool = False,
) -> LowRankProductRepresentation:
    """The `rank` eigenpairs of largest magnitude of the model's Hessian (or Gauss-Newton
    matrix) over the training data, by Lanczos.

    See [lanczos_eigenpairs][influx.torch.inverse.low_rank_approximation.lanczos_eigenpairs] for the parameters;
    `restrict_to` selects the parameters (None: all trainable ones).
    """
    operator = curvature_operator(second_order_mode, model, loss, training_data, restrict_to)
    rank = validate_rank(rank, operator.input_size)
    return lanczos_low_rank(
        operator, rank, krylov_dimension, tol, max_iter, progress=progress
    ).representation


def model_hessian_nystroem_approximation(
    model: torch.nn.Module,
    loss: LossOrTask,
    data_loader: DataLoader,
    rank: int,
    shift_func: Optional[Callable[[torch.Tensor], Union[torch.Tensor, float]]] = None,
    restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    second_order_mode: SecondOrderMode = SecondOrderMode.GAUSS_NEWTON,
    generator: Optional[torch.Generator] = None,
) -> LowRankProductRepresentation:
    r"""Randomized Nyström approximation of the model's Gauss-Newton matrix (or Hessian, which
    must then be positive semi-definite) over the training data.

    The curvature defaults to the Gauss-Newton matrix, which is positive semi-definite as the
    sketch requires; pass `second_order_mode=SecondOrderMode.HESSIAN` for the Hessian of a
    convex model. See [nystroem_low_rank][influx.torch.inverse.low_rank_approximation.nystroem_low_rank].

    Args:
        model: the model.
        loss: the loss function (mean reduction).
        data_loader: the training data.
        rank: the sketch size (clipped to the number of parameters with a warning).
        shift_func: $Y \mapsto \nu$, the stabilising shift of the sketch; see
            [randomized_nystroem_approximation][influx.torch.inverse.sketch.randomized_nystroem_approximation].
        restrict_to: the parameters (None: all trainable ones).
        second_order_mode: the curvature.
        generator: random generator for the test matrix.
    """
    operator = curvature_operator(second_order_mode, model, loss, data_loader, restrict_to)
    return nystroem_low_rank(operator, rank, generator, shift_func).representation
