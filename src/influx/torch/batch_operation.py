"""Batch operations and averaging, at pyDVL's `influence.torch.batch_operation` path.

A re-export module. The names live in
[influx.torch.curvature.batch_operation][influx.torch.curvature.batch_operation] and
[influx.torch.curvature.averaging][influx.torch.curvature.averaging]. Nothing in the library
imports this path.
"""

from .curvature.averaging import (
    ChunkAveraging,
    PointAveraging,
)
from .curvature.batch_operation import (
    BatchOperation,
    BatchOperationType,
    GaussNewtonBatchOperation,
    HessianBatchOperation,
    InverseHarmonicMeanBatchOperation,
    LossBatchOperation,
    TensorAveragingType,
)

__all__ = [
    "BatchOperation",
    "BatchOperationType",
    "ChunkAveraging",
    "GaussNewtonBatchOperation",
    "HessianBatchOperation",
    "InverseHarmonicMeanBatchOperation",
    "LossBatchOperation",
    "PointAveraging",
    "TensorAveragingType",
]
