r"""Estimates of the extreme eigenvalues of a symmetric matrix given by its action on rows.

[estimate_largest_eigenvalue][influx.torch.inverse.spectrum.estimate_largest_eigenvalue] (block
power iteration) sets LiSSA's automatic scale;
[lanczos_extreme_eigenvalues][influx.torch.inverse.spectrum.lanczos_extreme_eigenvalues] (a few
Lanczos steps) tells the sign of the smallest eigenvalue when LiSSA diverges. Nothing here
knows about models.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["estimate_largest_eigenvalue", "lanczos_extreme_eigenvalues"]

RowMap = Callable[[torch.Tensor], torch.Tensor]


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


def lanczos_extreme_eigenvalues(
    apply: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    dtype: torch.dtype,
    device: torch.device,
    steps: int = 30,
    generator: Optional[torch.Generator] = None,
) -> "tuple[float, float]":
    r"""Estimates of the smallest and largest eigenvalue of a symmetric matrix by a few
    Lanczos steps.

    From a random unit vector $q_1$, `steps` steps of the Lanczos recurrence (with full
    re-orthogonalisation) build $Q_k$ and the tridiagonal $T_k = Q_k^\top M Q_k$; the extreme
    eigenvalues of $T_k$ (Ritz values) approach those of $M$ from the inside, the extremes
    first, so a few steps tell the sign of the smallest eigenvalue when it is well separated
    from zero.

    Args:
        apply: $V \mapsto V M^\top$ for rows `V` `(K, P)`.
        size: $P$.
        dtype: dtype of the vectors.
        device: device of the vectors.
        steps: the number of Lanczos steps (at most $P$).
        generator: random generator of the start vector, for reproducibility.

    Returns:
        `(smallest, largest)` Ritz value.
    """
    steps = max(1, min(steps, size))
    q = torch.randn(1, size, dtype=dtype, device=device, generator=generator)
    q = q / torch.linalg.norm(q)
    basis = [q]
    alphas: list = []
    betas: list = []
    for k in range(steps):
        w = apply(basis[k])
        alpha = float((w * basis[k]).sum())
        alphas.append(alpha)
        stacked = torch.cat(basis)
        for _ in range(2):
            w = w - (w @ stacked.T) @ stacked
        beta = float(torch.linalg.norm(w))
        if k == steps - 1 or beta <= 1e-10 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        basis.append(w / beta)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(tridiagonal)
    return float(ritz[0]), float(ritz[-1])
