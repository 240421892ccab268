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
from .batch_operation import (
    BatchOperation,
    GaussNewtonBatchOperation,
    HessianBatchOperation,
    InverseHarmonicMeanBatchOperation,
)
from .cg import CgOperator
from .composition import (
    ArnoldiSolver,
    CgSolver,
    Curvature,
    DirectSolver,
    FactoredSolver,
    InverseHarmonicMeanSolver,
    KroneckerCurvature,
    LissaSolver,
    ModeCurvature,
    NystroemSolver,
    Solver,
)
from .curvature import (
    GaussNewtonOperator,
    GeneralizedGaussNewtonOperator,
    HessianOperator,
    SecondOrderMode,
)
from .direct import DirectSolveOperator
from .functional import LowRankProductRepresentation
from .generalized_gauss_newton import GeneralizedGaussNewtonBatchOperation
from .inverse_harmonic_mean import InverseHarmonicMeanOperator
from .kfac import NotImplementedLayerRepresentationException
from .kfac_operator import KroneckerFactoredCurvature, KroneckerFactoredOperator
from .lissa import LissaOperator
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
from .models import (
    ArnoldiInfluence,
    CgInfluence,
    ComposedInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    ProjectedInfluence,
)
from .preconditioner import (
    EkfacPreconditioner,
    JacobiPreconditioner,
    NystroemPreconditioner,
    Preconditioner,
)
from .projected_gradients import IdentityOperator, ProjectedCurvature, ProjectedGradientProvider
from .tensor_operator import MatrixOperator, ShiftedOperator
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
    "ArnoldiSolver",
    "CgSolver",
    "ComposedInfluence",
    "Curvature",
    "DirectSolver",
    "FactoredSolver",
    "InverseHarmonicMeanSolver",
    "KroneckerCurvature",
    "KroneckerFactoredCurvature",
    "LissaSolver",
    "ModeCurvature",
    "NystroemSolver",
    "ShiftedOperator",
    "Solver",
    "ArnoldiInfluence",
    "BatchOperation",
    "BlockMode",
    "CgInfluence",
    "CgOperator",
    "DictBilinearForm",
    "DirectInfluence",
    "DirectSolveOperator",
    "EkfacInfluence",
    "GaussNewtonBatchOperation",
    "GaussNewtonOperator",
    "GeneralizedGaussNewtonBatchOperation",
    "GeneralizedGaussNewtonOperator",
    "EkfacPreconditioner",
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
    "ProjectedInfluence",
    "ProjectedCurvature",
    "ProjectedGradientProvider",
    "IdentityOperator",
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
