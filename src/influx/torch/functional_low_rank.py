r"""Low-rank representations of curvature operators: the Nystroem sketch of a positive
semi-definite operator from its products with random vectors.

Pure torch functions without state; re-exported by
[influx.torch.functional][influx.torch.functional].
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

__all__ = ["LowRankProductRepresentation", "randomized_nystroem_approximation", "nystroem_sketch"]


class LowRankProductRepresentation:
    r"""A symmetric low-rank matrix $A = V D V^\top$.

    Args:
        eigen_vals: the diagonal of $D$, shape `(r,)`.
        projections: the columns of $V$, shape `(P, r)`, orthonormal.
    """

    def __init__(self, eigen_vals: torch.Tensor, projections: torch.Tensor):
        if eigen_vals.ndim != 1 or projections.ndim != 2:
            raise ValueError(
                "Parameters 'eigen_vals' and 'projections' must have shapes (r,) and (P, r), "
                f"got {tuple(eigen_vals.shape)} and {tuple(projections.shape)}."
            )
        if projections.shape[1] != eigen_vals.shape[0]:
            raise ValueError(
                f"Parameter 'projections' must have {eigen_vals.shape[0]} columns (one per "
                f"eigenvalue), got shape {tuple(projections.shape)}."
            )
        self.eigen_vals = eigen_vals
        self.projections = projections

    @property
    def device(self) -> torch.device:
        return self.projections.device

    def to(self, device: torch.device) -> "LowRankProductRepresentation":
        """A copy on `device` (the representation itself is unchanged)."""
        return LowRankProductRepresentation(self.eigen_vals.to(device), self.projections.to(device))


def randomized_nystroem_approximation(
    mat_mat_prod: Callable[[torch.Tensor], torch.Tensor],
    input_dim: int,
    rank: int,
    input_type: torch.dtype,
    mat_vec_device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> LowRankProductRepresentation:
    r"""Randomized Nyström approximation $A \approx V D V^\top$ of a positive semi-definite $A$.

    With a Gaussian test matrix orthonormalised to $Q$ `(P, r)` and $Y = AQ$, the Nyström
    approximation is $A_{\text{nys}} = Y (Q^\top Y)^{+} Y^\top$. A small shift
    $\nu = \sqrt{P}\,\epsilon\,\|Y\|$ keeps the Cholesky factorisation of $Q^\top Y$ stable
    and is removed from the eigenvalues afterwards. At $r = P$ the approximation is exact; for
    a matrix of rank at most $r$ it is exact almost surely.

    If $Q^\top A Q$ is not positive definite, $A$ has negative curvature along the sketch:
    a warning is logged and only the positive part of $Q^\top A Q$ is used (the result then
    approximates neither $A$ nor its positive part exactly).

    Args:
        mat_mat_prod: $X \mapsto A X$ for a matrix $X$ `(P, k)`.
        input_dim: $P$.
        rank: $r$, the number of eigenpairs.
        input_type: dtype of the test matrix.
        mat_vec_device: device of the test matrix.
        generator: optional random generator, for reproducibility.

    Returns:
        The eigenvalues (descending, non-negative) and orthonormal eigenvectors; fewer than
        `rank` of them if negative curvature was found.
    """
    representation, _ = nystroem_sketch(
        mat_mat_prod, input_dim, rank, input_type, mat_vec_device, generator
    )
    return representation


def nystroem_sketch(
    mat_mat_prod: Callable[[torch.Tensor], torch.Tensor],
    input_dim: int,
    rank: int,
    input_type: torch.dtype,
    mat_vec_device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[LowRankProductRepresentation, float]:
    """[randomized_nystroem_approximation][influx.torch.functional.randomized_nystroem_approximation],
    also returning the smallest eigenvalue of $Q^\top A Q$ (negative: negative curvature
    was detected along the sketch)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"Parameter 'rank' must be an int, got {type(rank).__name__}.")
    if not 0 < rank <= input_dim:
        raise ValueError(f"Parameter 'rank' must be in [1, {input_dim}], got {rank}.")
    omega = torch.randn(
        input_dim, rank, dtype=input_type, device=mat_vec_device, generator=generator
    )
    q, _ = torch.linalg.qr(omega)
    y = mat_mat_prod(q)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(
            "The operator returned NaN or Inf in the Nyström sketch: check the model, the loss "
            "and the data."
        )
    shift = math.sqrt(input_dim) * torch.finfo(y.dtype).eps * torch.linalg.norm(y)
    y_shifted = y + shift * q
    core = q.T @ y_shifted
    core = (core + core.T) / 2
    chol, info = torch.linalg.cholesky_ex(core)
    if int(info) == 0:
        smallest = float(torch.linalg.eigvalsh(core)[0] - shift)
        b = torch.linalg.solve_triangular(chol, y_shifted.T, upper=False).T
    else:
        evals, evecs = torch.linalg.eigh(core)
        smallest = float(evals[0] - shift)
        keep = evals > shift
        logger.warning(
            "Nyström sketch: the matrix has negative curvature along the sketch (smallest "
            "eigenvalue of Q^T A Q: %.3g, %d of %d directions dropped). The approximation "
            "assumes a positive semi-definite matrix; use the Gauss-Newton matrix or a convex "
            "model.",
            smallest,
            int((~keep).sum()),
            rank,
        )
        b = y_shifted @ evecs[:, keep] / torch.sqrt(evals[keep])
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    eigen_vals = torch.clamp(sigma**2 - shift, min=0.0)
    return LowRankProductRepresentation(eigen_vals, u), smallest
