"""The torch implementation of influx: influence models, operators and gradient providers.

Importing this package does not import dask, distributed or zarr, nor the chunk layer of the
calculators: the torch-side converters (`TorchNumpyConverter`, `TorchCatAggregator`,
`NestedTorchCatAggregator`, `torch_dataset_to_dask_array`) are loaded on first use.
"""

import importlib
from typing import Any

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
from .blocks import BlockMode
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
from .ensemble import EnsembleInfluence
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
from .sketch import LowRankProductRepresentation
from .task import SupervisedTask, Task
from .tensor_operator import MatrixOperator, ShiftedOperator
from .twice_differentiable import TorchTensorUtilities, TorchTwiceDifferentiable
from .valuation import (
    HarmfulRanking,
    TopKInfluences,
    rank_training_points,
    top_k_from_array,
    top_k_influences,
)

# isort: split
from .tracker import InfluenceTracker  # imports the names above from this package

__all__ = [
    "EnsembleInfluence",
    "InfluenceTracker",
    "Task",
    "SupervisedTask",
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


_CONVERTERS = {
    "NestedTorchCatAggregator",
    "TorchCatAggregator",
    "TorchNumpyConverter",
    "torch_dataset_to_dask_array",
}


def __getattr__(name: str) -> Any:
    if name in _CONVERTERS:
        return getattr(importlib.import_module(".array_converters", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
