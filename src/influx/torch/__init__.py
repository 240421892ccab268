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
from .influence_function_model import CgInfluence, DirectInfluence, LissaInfluence
from .iterative import CgOperator, LissaOperator
from .operator import (
    DirectSolveOperator,
    GaussNewtonOperator,
    HessianOperator,
    MatrixOperator,
    SecondOrderMode,
)
from .preconditioner import JacobiPreconditioner, NystroemPreconditioner, Preconditioner
from .twice_differentiable import TorchTensorUtilities, TorchTwiceDifferentiable
from .util import BlockMode
from .valuation import (
    HarmfulRanking,
    TopKInfluences,
    rank_training_points,
    top_k_from_array,
    top_k_influences,
)

__all__ = [
    "BatchOperation",
    "BlockMode",
    "CgInfluence",
    "CgOperator",
    "DictBilinearForm",
    "DirectInfluence",
    "DirectSolveOperator",
    "GaussNewtonBatchOperation",
    "GaussNewtonOperator",
    "HarmfulRanking",
    "HessianBatchOperation",
    "HessianOperator",
    "InfluenceMode",
    "JacobiPreconditioner",
    "LissaInfluence",
    "LissaOperator",
    "LowRankProductRepresentation",
    "MatrixOperator",
    "NotFittedException",
    "NystroemPreconditioner",
    "OperatorBilinearForm",
    "Preconditioner",
    "SecondOrderMode",
    "TensorDictOperator",
    "TensorOperator",
    "TopKInfluences",
    "TorchBatch",
    "TorchBlockMapper",
    "TorchComposableInfluence",
    "TorchGradientProvider",
    "TorchOperatorGradientComposition",
    "TorchTensorUtilities",
    "TorchTwiceDifferentiable",
    "UnsupportedInfluenceModeException",
    "rank_training_points",
    "top_k_from_array",
    "top_k_influences",
]
