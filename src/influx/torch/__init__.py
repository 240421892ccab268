"""The torch implementation of influx: influence models, operators and gradient providers.

Importing this package does not import dask, distributed or zarr, nor the chunk layer of the
calculators: the torch-side converters (`TorchNumpyConverter`, `TorchCatAggregator`,
`NestedTorchCatAggregator`, `torch_dataset_to_dask_array`) are loaded on first use.
"""

import importlib
from typing import Any

from ..types import InfluenceMode, NotFittedException, UnsupportedInfluenceModeException
from .composition.block_mapper import TorchBlockMapper, TorchOperatorGradientComposition
from .composition.composable import TorchComposableInfluence
from .composition.curvatures import Curvature, KroneckerCurvature, ModeCurvature
from .composition.heads import AttentionHeads
from .composition.solvers import (
    ArnoldiSolver,
    CgSolver,
    DirectSolver,
    FactoredSolver,
    InverseHarmonicMeanSolver,
    LissaSolver,
    NystroemSolver,
    Solver,
)
from .curvature.batch_operation import (
    BatchOperation,
    GaussNewtonBatchOperation,
    HessianBatchOperation,
    InverseHarmonicMeanBatchOperation,
)
from .curvature.generalized_gauss_newton import GeneralizedGaussNewtonBatchOperation
from .curvature.operators import (
    GaussNewtonOperator,
    GeneralizedGaussNewtonOperator,
    HessianOperator,
    SecondOrderMode,
)
from .curvature.tensor_operator import (
    MatrixOperator,
    ShiftedOperator,
    TensorDictOperator,
    TensorOperator,
)
from .data.batches import TorchBatch
from .data.blocks import BlockMode
from .data.causal_lm import CausalLMTask
from .data.task import SupervisedTask, Task
from .gradients.bilinear import DictBilinearForm, OperatorBilinearForm
from .gradients.provider import TorchGradientProvider
from .inverse.cg import CgOperator
from .inverse.direct import DirectSolveOperator
from .inverse.ekfac_preconditioner import EkfacPreconditioner
from .inverse.inverse_harmonic_mean import InverseHarmonicMeanOperator
from .inverse.lissa import LissaOperator
from .inverse.low_rank import LowRankBilinearForm, LowRankOperator
from .inverse.low_rank_approximation import (
    LowRankApproximation,
    lanczos_eigenpairs,
    lanczos_low_rank,
    model_hessian_low_rank,
    model_hessian_nystroem_approximation,
    nystroem_low_rank,
)
from .inverse.preconditioner import JacobiPreconditioner, NystroemPreconditioner, Preconditioner
from .inverse.sketch import LowRankProductRepresentation
from .kfac.factors import NotImplementedLayerRepresentationException
from .kfac.operators import KroneckerFactoredCurvature, KroneckerFactoredOperator
from .kfac.query import low_rank_query_factors
from .legacy.inversion_methods import TorchTensorUtilities, TorchTwiceDifferentiable
from .models import (
    ArnoldiInfluence,
    CgInfluence,
    ComposedInfluence,
    DirectInfluence,
    EkfacInfluence,
    EnsembleInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    ProjectedInfluence,
)
from .projection.gradients import IdentityOperator, ProjectedCurvature, ProjectedGradientProvider
from .workflows.valuation import (
    HarmfulRanking,
    TopKInfluences,
    rank_training_points,
    top_k_from_array,
    top_k_influences,
)

# isort: split
from .workflows.tracker import InfluenceTracker

__all__ = [
    "EnsembleInfluence",
    "InfluenceTracker",
    "Task",
    "AttentionHeads",
    "CausalLMTask",
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
    "low_rank_query_factors",
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
        return getattr(importlib.import_module(".data.array_converters", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
