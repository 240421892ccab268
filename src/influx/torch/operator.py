"""The operators, at pyDVL's `influence.torch.operator` path.

A re-export module. Curvature operators
([influx.torch.curvature.operators][influx.torch.curvature.operators]) apply $C$; inverse
operators apply $(C + \\lambda I)^{-1}$: the direct solve
([influx.torch.inverse.direct][influx.torch.inverse.direct]), conjugate gradient
([influx.torch.inverse.cg][influx.torch.inverse.cg]), LiSSA
([influx.torch.inverse.lissa][influx.torch.inverse.lissa]), low rank
([influx.torch.inverse.low_rank][influx.torch.inverse.low_rank]), the inverse harmonic mean
([influx.torch.inverse.inverse_harmonic_mean][influx.torch.inverse.inverse_harmonic_mean]) and
the Kronecker-factored inverse ([influx.torch.kfac.operators][influx.torch.kfac.operators]).
Their common base is in
[influx.torch.curvature.tensor_operator][influx.torch.curvature.tensor_operator]. Nothing in
the library imports this path.
"""

from .curvature.operators import (
    AveragingBatchOperator,
    GaussNewtonOperator,
    GeneralizedGaussNewtonOperator,
    HessianOperator,
    PrecomputedGaussNewtonOperator,
    SecondOrderMode,
    curvature_operator,
)
from .curvature.tensor_operator import MatrixOperator, ShiftedOperator
from .data.batches import iterate_batches
from .inverse.cg import CgOperator
from .inverse.direct import DirectSolveOperator
from .inverse.inverse_harmonic_mean import InverseHarmonicMeanOperator
from .inverse.lissa import LissaOperator
from .inverse.low_rank import LowRankOperator
from .kfac.operators import KroneckerFactoredCurvature, KroneckerFactoredOperator

__all__ = [
    "AveragingBatchOperator",
    "CgOperator",
    "DirectSolveOperator",
    "GaussNewtonOperator",
    "GeneralizedGaussNewtonOperator",
    "HessianOperator",
    "InverseHarmonicMeanOperator",
    "KroneckerFactoredCurvature",
    "KroneckerFactoredOperator",
    "LissaOperator",
    "LowRankOperator",
    "MatrixOperator",
    "PrecomputedGaussNewtonOperator",
    "SecondOrderMode",
    "ShiftedOperator",
    "curvature_operator",
    "iterate_batches",
]
