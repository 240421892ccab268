"""The operators, at pyDVL's import path.

Curvature operators ([influx.torch.curvature][influx.torch.curvature]) apply $C$; inverse
operators apply $(C + \\lambda I)^{-1}$: the direct solve ([influx.torch.direct][influx.torch.direct]),
conjugate gradient ([influx.torch.cg][influx.torch.cg]), LiSSA
([influx.torch.lissa][influx.torch.lissa]), low rank ([influx.torch.low_rank][influx.torch.low_rank]),
the inverse harmonic mean ([influx.torch.inverse_harmonic_mean][influx.torch.inverse_harmonic_mean])
and the Kronecker-factored inverse ([influx.torch.kfac_operator][influx.torch.kfac_operator]).
Their common base is in [influx.torch.tensor_operator][influx.torch.tensor_operator].
"""

from .cg import CgOperator
from .curvature import (
    AveragingBatchOperator,
    GaussNewtonOperator,
    GeneralizedGaussNewtonOperator,
    HessianOperator,
    PrecomputedGaussNewtonOperator,
    SecondOrderMode,
    curvature_operator,
)
from .data import iterate_batches
from .direct import DirectSolveOperator
from .inverse_harmonic_mean import InverseHarmonicMeanOperator
from .kfac_operator import KroneckerFactoredCurvature, KroneckerFactoredOperator
from .lissa import LissaOperator
from .low_rank import LowRankOperator
from .tensor_operator import MatrixOperator, ShiftedOperator

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
