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
from .generalized_gauss_newton import GeneralizedGaussNewtonBatchOperation
from .influence_function_model import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)
from .inverse_harmonic_mean import InverseHarmonicMeanBatchOperation, InverseHarmonicMeanOperator
from .iterative import CgOperator, LissaOperator
from .kfac import KroneckerFactoredOperator, NotImplementedLayerRepresentationException
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
    GeneralizedGaussNewtonOperator,
    HessianOperator,
    MatrixOperator,
    SecondOrderMode,
)
from .preconditioner import (
    EkfacPreconditioner,
    JacobiPreconditioner,
    NystroemPreconditioner,
    Preconditioner,
)
from .twice_differentiable import TorchTensorUtilities, TorchTwiceDifferentiable
from .util import (
    BlockMode,
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
    torch_dataset_to_dask_array,
)
from .valuation import (
    HarmfulRanking,
    TopKInfluences,
    rank_training_points,
    top_k_from_array,
    top_k_influences,
)

__all__ = [
    "ArnoldiInfluence",
    "BatchOperation",
    "BlockMode",
    "CgInfluence",
    "CgOperator",
    "DictBilinearForm",
    "DirectInfluence",
    "DirectSolveOperator",
    "EkfacInfluence",
    "EkfacPreconditioner",
    "GaussNewtonBatchOperation",
    "GaussNewtonOperator",
    "GeneralizedGaussNewtonBatchOperation",
    "GeneralizedGaussNewtonOperator",
    "HarmfulRanking",
    "HessianBatchOperation",
    "HessianOperator",
    "InfluenceMode",
    "JacobiPreconditioner",
    "LissaInfluence",
    "LissaOperator",
    "KroneckerFactoredOperator",
    "LowRankProductRepresentation",
    "MatrixOperator",
    "NestedTorchCatAggregator",
    "NotFittedException",
    "NystroemPreconditioner",
    "InverseHarmonicMeanBatchOperation",
    "InverseHarmonicMeanInfluence",
    "InverseHarmonicMeanOperator",
    "LowRankApproximation",
    "LowRankBilinearForm",
    "LowRankOperator",
    "NystroemSketchInfluence",
    "NotImplementedLayerRepresentationException",
    "OperatorBilinearForm",
    "Preconditioner",
    "SecondOrderMode",
    "TensorDictOperator",
    "TensorOperator",
    "TopKInfluences",
    "TorchBatch",
    "TorchBlockMapper",
    "TorchCatAggregator",
    "TorchComposableInfluence",
    "TorchGradientProvider",
    "TorchNumpyConverter",
    "TorchOperatorGradientComposition",
    "TorchTensorUtilities",
    "TorchTwiceDifferentiable",
    "UnsupportedInfluenceModeException",
    "rank_training_points",
    "top_k_from_array",
    "top_k_influences",
    "lanczos_eigenpairs",
    "lanczos_low_rank",
    "model_hessian_low_rank",
    "model_hessian_nystroem_approximation",
    "nystroem_low_rank",
    "torch_dataset_to_dask_array",
]
