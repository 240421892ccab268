r"""Low-rank representations and randomized sketches of symmetric matrices.

Pure linear algebra on a matrix given by its action: nothing here knows about models.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Tuple, Union

import torch

__all__ = [
    "LowRankProductRepresentation",
    "ShiftFunction",
    "nystroem_sketch",
    "randomized_nystroem_approximation",
]

logger = logging.getLogger(__name__)


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

    @property
    def dtype(self) -> torch.dtype:
        return self.projections.dtype

    def to(self, device: Union[torch.device, str]) -> "LowRankProductRepresentation":
        """A copy on `device` (the representation itself is unchanged), as for a tensor."""
        return LowRankProductRepresentation(self.eigen_vals.to(device), self.projections.to(device))


ShiftFunction = Callable[[torch.Tensor], Union[torch.Tensor, float]]


def randomized_nystroem_approximation(
    mat_mat_prod: Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
    input_dim: int,
    rank: int,
    input_type: torch.dtype,
    shift_func: Optional[Union[ShiftFunction, torch.device, str]] = None,
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

    A `rank` larger than $P$ is clipped to $P$ with a logged warning.

    Args:
        mat_mat_prod: $X \mapsto A X$ for a matrix $X$ `(P, k)`, or the matrix $A$ itself.
        input_dim: $P$.
        rank: $r$, the number of eigenpairs.
        input_type: dtype of the test matrix.
        shift_func: $Y \mapsto \nu$, the shift for the sketch $Y = AQ$; None means
            $\sqrt{P}\,\epsilon\,\|Y\|$. (A device given here, in the position of earlier
            versions, is taken as `mat_vec_device`.)
        mat_vec_device: device of the test matrix.
        generator: optional random generator, for reproducibility.

    Returns:
        The eigenvalues (descending, non-negative) and orthonormal eigenvectors; fewer than
        `rank` of them if negative curvature was found.
    """
    if isinstance(shift_func, (torch.device, str)):
        mat_vec_device = torch.device(shift_func)
        shift_func = None
    if isinstance(mat_mat_prod, torch.Tensor):
        matrix = mat_mat_prod

        def product(x: torch.Tensor) -> torch.Tensor:
            return matrix @ x

        mat_mat_prod = product
    representation, _ = nystroem_sketch(
        mat_mat_prod, input_dim, rank, input_type, mat_vec_device, generator, shift_func
    )
    return representation


def nystroem_sketch(
    mat_mat_prod: Callable[[torch.Tensor], torch.Tensor],
    input_dim: int,
    rank: int,
    input_type: torch.dtype,
    mat_vec_device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
    shift_func: Optional[ShiftFunction] = None,
) -> Tuple[LowRankProductRepresentation, float]:
    """[randomized_nystroem_approximation][influx.torch.inverse.sketch.randomized_nystroem_approximation],
    also returning the smallest eigenvalue of $Q^\top A Q$ (negative: negative curvature
    was detected along the sketch)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"Parameter 'rank' must be an int, got {type(rank).__name__}.")
    if rank < 1:
        raise ValueError(f"Parameter 'rank' must be in [1, {input_dim}], got {rank}.")
    if rank > input_dim:
        logger.warning(
            "Parameter 'rank' (%d) exceeds the dimension %d of the matrix: using rank %d.",
            rank,
            input_dim,
            input_dim,
        )
        rank = input_dim
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
    if shift_func is None:
        shift = math.sqrt(input_dim) * torch.finfo(y.dtype).eps * torch.linalg.norm(y)
    else:
        shift = torch.as_tensor(shift_func(y), dtype=y.dtype, device=y.device)
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
