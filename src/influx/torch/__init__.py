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
from .influence_function_model import DirectInfluence, EkfacInfluence
from .kfac import KroneckerFactoredOperator, NotImplementedLayerRepresentationException
from .operator import (
    DirectSolveOperator,
    GaussNewtonOperator,
    HessianOperator,
    MatrixOperator,
    SecondOrderMode,
)
from .util import BlockMode

__all__ = [
    "BatchOperation",
    "BlockMode",
    "DictBilinearForm",
    "DirectInfluence",
    "DirectSolveOperator",
    "EkfacInfluence",
    "GaussNewtonBatchOperation",
    "GaussNewtonOperator",
    "HessianBatchOperation",
    "HessianOperator",
    "InfluenceMode",
    "KroneckerFactoredOperator",
    "LowRankProductRepresentation",
    "MatrixOperator",
    "NotFittedException",
    "NotImplementedLayerRepresentationException",
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
]
