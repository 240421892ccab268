r"""The automatic regularization: $\lambda$ relative to the curvature's own scale.

`regularization="auto"` sets, for every block with curvature $C \in \mathbb{R}^{P \times P}$,

$$
\lambda = c \cdot \bar\mu(C), \qquad
\bar\mu(C) = \frac{\operatorname{tr} C}{P} \quad \text{(the mean eigenvalue)},
$$

with $c$ = [AUTO_DAMPING_FACTOR][influx.torch.inverse.damping.AUTO_DAMPING_FACTOR] $= 0.1$ (the
choice of Kronfluence for its Kronecker factors; see `docs/methods.md` for the measurements).
For an indefinite curvature whose trace is not positive (a Hessian far from a minimum), the
root mean square eigenvalue $\sqrt{\operatorname{tr}(C^2) / P} = \|C\|_F / \sqrt{P}$ replaces
the mean. The trace is

* exact for a dense matrix (the direct solve has it anyway),
* $\operatorname{mean}(s)$ of the eigenvalues $s$ of a Kronecker-factored curvature (for K-FAC
  $s = \lambda_G \lambda_A^\top$, so this is the product of the factors' mean eigenvalues),
* otherwise a Hutchinson estimate $\operatorname{tr} C \approx \frac{1}{m} \sum_i z_i^\top C z_i$
  with $m$ = [HUTCHINSON_PROBES][influx.torch.inverse.damping.HUTCHINSON_PROBES] seeded
  Rademacher vectors $z_i$ (one application of $C$ to $m$ rows).
"""

from __future__ import annotations

import math

import torch

from ..curvature.tensor_operator import MatrixOperator, TensorOperator
from ..kfac.operators import KroneckerFactoredCurvature

__all__ = [
    "AUTO_DAMPING_FACTOR",
    "HUTCHINSON_PROBES",
    "auto_regularization",
    "auto_regularization_of_matrix",
    "curvature_scale",
]

AUTO_DAMPING_FACTOR = 0.1
r"""$c$ in $\lambda = c \cdot \operatorname{tr}(C) / P$."""

HUTCHINSON_PROBES = 8
"""The number of Rademacher probes of the Hutchinson trace estimate."""

_SEED = 0


def _scale_from(mean: float, mean_square: float) -> float:
    r"""The mean eigenvalue if positive, else the root mean square eigenvalue (or 0)."""
    if mean > 0:
        return mean
    return math.sqrt(max(mean_square, 0.0))


def _matrix_scale(matrix: torch.Tensor) -> float:
    size = matrix.shape[0]
    mean = float(torch.diagonal(matrix).sum()) / size
    if mean > 0:
        return mean
    return float(torch.linalg.norm(matrix)) / math.sqrt(size)


def curvature_scale(curvature: TensorOperator, probes: int = HUTCHINSON_PROBES) -> float:
    r"""$\bar\mu(C)$: the curvature's mean eigenvalue (exact where cheap, else Hutchinson), or
    its root mean square eigenvalue if the trace is not positive.

    Args:
        curvature: the curvature operator $C$ (without regularization).
        probes: the number of Hutchinson probes (seeded, reproducible).
    """
    if isinstance(curvature, KroneckerFactoredCurvature):
        s = curvature.eigenvalues
        return _scale_from(float(s.mean()), float((s**2).mean()))
    if isinstance(curvature, MatrixOperator):
        return _matrix_scale(curvature.to_dense())
    size = curvature.input_size
    generator = torch.Generator(device=curvature.device).manual_seed(_SEED)
    z = torch.randint(0, 2, (probes, size), generator=generator, device=curvature.device).to(
        curvature.dtype
    )
    z = 2 * z - 1
    w = curvature.apply(z)
    mean = float((z * w).sum(dim=1).mean()) / size
    mean_square = float((w * w).sum(dim=1).mean()) / size
    return _scale_from(mean, mean_square)


def auto_regularization(curvature: TensorOperator) -> float:
    r"""$\lambda = c \cdot \bar\mu(C)$ for a curvature operator (see the module)."""
    return AUTO_DAMPING_FACTOR * curvature_scale(curvature)


def auto_regularization_of_matrix(matrix: torch.Tensor) -> float:
    r"""$\lambda = c \cdot \operatorname{tr}(C) / P$ for a dense symmetric matrix $C$ (exact
    trace; the root mean square eigenvalue if the trace is not positive)."""
    return AUTO_DAMPING_FACTOR * _matrix_scale(matrix)
