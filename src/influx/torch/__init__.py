"""The torch implementation of influx: influence models, operators and gradient providers.

Importing this package does not import dask, distributed or zarr.
"""

from ..types import InfluenceMode, NotFittedException, UnsupportedInfluenceModeException
from .base import (
    DictBilinearForm,
    OperatorBilinearForm,
    TensorDictOperator,
    TensorOperator,
    TorchBatch,
    TorchBlockMapper,
    TorchComposableInfluence,
    TorchGradientProvider,
    TorchOperatorGradientComposition,
)
from .batch_operation import BatchOperation, GaussNewtonBatchOperation, HessianBatchOperation
from .functional import LowRankProductRepresentation
from .influence_function_model import (
    ArnoldiInfluence,
    DirectInfluence,
    InverseHarmonicMeanInfluence,
    NystroemSketchInfluence,
)
from .inverse_harmonic_mean import InverseHarmonicMeanBatchOperation, InverseHarmonicMeanOperator
from .low_rank import (
    LowRankApproximation,
    LowRankBilinearForm,
    LowRankOperator,
    lanczos_eigenpairs,
    lanczos_low_rank,
    model_hessian_low_rank,
    model_hessian_nystroem_approximation,
    nystroem_low_rank,
)
from .operator import (
    DirectSolveOperator,
    GaussNewtonOperator,
    HessianOperator,
    MatrixOperator,
    SecondOrderMode,
)
from .util import BlockMode

__all__ = [
    "ArnoldiInfluence",
    "BatchOperation",
    "BlockMode",
    "DictBilinearForm",
    "DirectInfluence",
    "DirectSolveOperator",
    "GaussNewtonBatchOperation",
    "GaussNewtonOperator",
    "HessianBatchOperation",
    "HessianOperator",
    "InfluenceMode",
    "InverseHarmonicMeanBatchOperation",
    "InverseHarmonicMeanInfluence",
    "InverseHarmonicMeanOperator",
    "LowRankApproximation",
    "LowRankBilinearForm",
    "LowRankOperator",
    "LowRankProductRepresentation",
    "MatrixOperator",
    "NotFittedException",
    "NystroemSketchInfluence",
    "OperatorBilinearForm",
    "SecondOrderMode",
    "TensorDictOperator",
    "TensorOperator",
    "TorchBatch",
    "TorchBlockMapper",
    "TorchComposableInfluence",
    "TorchGradientProvider",
    "TorchOperatorGradientComposition",
    "UnsupportedInfluenceModeException",
    "lanczos_eigenpairs",
    "lanczos_low_rank",
    "model_hessian_low_rank",
    "model_hessian_nystroem_approximation",
    "nystroem_low_rank",
]
