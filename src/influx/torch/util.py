"""Torch helpers at pyDVL's `influence.torch.util` path.

A re-export module. Block structures live in [influx.torch.data.blocks][influx.torch.data.blocks],
regularization checks in [influx.torch.data.validation][influx.torch.data.validation], the
reference's tensor-structure helpers in
[influx.torch.legacy.structures][influx.torch.legacy.structures], and the torch-side converters
for the calculators (numpy conversion, aggregators, dask arrays from torch datasets) in
[influx.torch.data.array_converters][influx.torch.data.array_converters]. Nothing in the library
imports this path: importing `influx.torch` does not load the chunk and zarr layer.
"""

from .autodiff.derivatives import flatten_dimensions, get_model_parameters
from .curvature.operators import SecondOrderMode
from .data.array_converters import (
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
    torch_dataset_to_dask_array,
)
from .data.blocks import FULL_BLOCK_NAME, BlockMode, BlockStructure, block_parameters
from .data.regularization import regularization_by_block
from .data.validation import RegularizationType, validate_regularization
from .legacy.structures import (
    EkfacRepresentation,
    LossType,
    ModelInfoMixin,
    ModelParameterDictBuilder,
    TorchLinalgEighException,
    TorchTensorContainerType,
    align_structure,
    align_with_model,
    empirical_cross_entropy_loss_fn,
    reshape_vector_to_tensors,
    safe_torch_linalg_eigh,
    to_model_device,
)

__all__ = [
    "EkfacRepresentation",
    "LossType",
    "ModelInfoMixin",
    "ModelParameterDictBuilder",
    "SecondOrderMode",
    "TorchLinalgEighException",
    "TorchTensorContainerType",
    "align_structure",
    "align_with_model",
    "empirical_cross_entropy_loss_fn",
    "flatten_dimensions",
    "get_model_parameters",
    "reshape_vector_to_tensors",
    "safe_torch_linalg_eigh",
    "to_model_device",
    "BlockMode",
    "BlockStructure",
    "FULL_BLOCK_NAME",
    "NestedTorchCatAggregator",
    "RegularizationType",
    "TorchCatAggregator",
    "TorchNumpyConverter",
    "block_parameters",
    "regularization_by_block",
    "torch_dataset_to_dask_array",
    "validate_regularization",
]
