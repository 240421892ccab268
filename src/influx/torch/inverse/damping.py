r"""The automatic regularization: $\lambda$ relative to the curvature's own scale.

`regularization="auto"` sets, for every block with curvature $C \in \mathbb{R}^{P \times P}$,

$$
\lambda = c \cdot \bar\mu(C), \qquad
\bar\mu(C) = \frac{\operatorname{tr} C}{P} \quad \text{(the mean eigenvalue)},
$$

with $c$ = [AUTO_DAMPING_FACTOR][influx.torch.inverse.damping.AUTO_DAMPING_FACTOR] $= 1$ for
the exact curvatures (Hessian, Gauss-Newton, generalized Gauss-Newton, and what the iterative,
low-rank and projected methods approximate) and $c$ =
[KRONECKER_DAMPING_FACTOR][influx.torch.inverse.damping.KRONECKER_DAMPING_FACTOR] $= 0.1$
for the Kronecker-factored ones (K-FAC, EK-FAC: Kronfluence's choice). Both were chosen by the
linear datamodeling score on the digits logistic regression, MLP and CNN of
`benchmarks/validity.py` (see the documentation's "Checking influence on your model"): with
them the exact Hessian's score is within 0.03 of the best $\lambda$ of a quarter-decade grid on
all three, while $0.1\,\bar\mu$ left the Hessian of the MLP and of the CNN indefinite (LDS 0.21
and 0.05 against 0.87 and 0.68). For an indefinite curvature whose trace is not positive (a
Hessian far from a minimum), a tenth of the root mean square eigenvalue,
$0.1 \sqrt{\operatorname{tr}(C^2) / P} = 0.1\,\|C\|_F / \sqrt{P}$, replaces the mean (it
scored as well as the mean on the three models). The trace is

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
    "KRONECKER_DAMPING_FACTOR",
    "RMS_FALLBACK_FACTOR",
    "auto_regularization",
    "auto_regularization_of_matrix",
    "curvature_scale",
]

AUTO_DAMPING_FACTOR = 1.0
r"""$c$ in $\lambda = c \cdot \operatorname{tr}(C) / P$ for the exact curvatures."""

KRONECKER_DAMPING_FACTOR = 0.1
r"""$c$ in $\lambda = c \cdot \operatorname{mean}(s)$ for Kronecker-factored curvatures."""

RMS_FALLBACK_FACTOR = 0.1
r"""The scale of a curvature whose trace is not positive: this times its root mean square
eigenvalue."""

HUTCHINSON_PROBES = 8
"""The number of Rademacher probes of the Hutchinson trace estimate."""

_SEED = 0


def _scale_from(mean: float, mean_square: float) -> float:
    r"""The mean eigenvalue if positive, else a tenth of the root mean square eigenvalue."""
    if mean > 0:
        return mean
    return RMS_FALLBACK_FACTOR * math.sqrt(max(mean_square, 0.0))


def _matrix_scale(matrix: torch.Tensor) -> float:
    size = matrix.shape[0]
    mean = float(torch.diagonal(matrix).sum()) / size
    if mean > 0:
        return mean
    return RMS_FALLBACK_FACTOR * float(torch.linalg.norm(matrix)) / math.sqrt(size)


def curvature_scale(curvature: TensorOperator, probes: int = HUTCHINSON_PROBES) -> float:
    r"""$\bar\mu(C)$: the curvature's mean eigenvalue (exact where cheap, else Hutchinson), or
    a tenth of its root mean square eigenvalue if the trace is not positive.

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
    r"""$\lambda = c \cdot \bar\mu(C)$ for a curvature operator (see the module): $c = 0.1$
    for a Kronecker-factored curvature, 1 otherwise."""
    factor = (
        KRONECKER_DAMPING_FACTOR
        if isinstance(curvature, KroneckerFactoredCurvature)
        else AUTO_DAMPING_FACTOR
    )
    return factor * curvature_scale(curvature)


def auto_regularization_of_matrix(matrix: torch.Tensor) -> float:
    r"""$\lambda = \operatorname{tr}(C) / P$ for a dense symmetric matrix $C$ of an exact
    curvature (exact trace; a tenth of the root mean square eigenvalue if the trace is not
    positive)."""
    return AUTO_DAMPING_FACTOR * _matrix_scale(matrix)
