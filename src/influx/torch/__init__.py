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
from .influence_function_model import DirectInfluence
from .operator import (
    DirectSolveOperator,
    GaussNewtonOperator,
    HessianOperator,
    MatrixOperator,
    SecondOrderMode,
)
from .util import (
    BlockMode,
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
    torch_dataset_to_dask_array,
)

__all__ = [
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
    "LowRankProductRepresentation",
    "MatrixOperator",
    "NestedTorchCatAggregator",
    "NotFittedException",
    "OperatorBilinearForm",
    "SecondOrderMode",
    "TensorDictOperator",
    "TensorOperator",
    "TorchBatch",
    "TorchBlockMapper",
    "TorchCatAggregator",
    "TorchComposableInfluence",
    "TorchGradientProvider",
    "TorchNumpyConverter",
    "TorchOperatorGradientComposition",
    "UnsupportedInfluenceModeException",
    "torch_dataset_to_dask_array",
]
