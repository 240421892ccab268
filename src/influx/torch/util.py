"""Torch helpers at pyDVL's `influence.torch.util` path.

Block structures live in [influx.torch.blocks][influx.torch.blocks], regularization checks in
[influx.torch.validation][influx.torch.validation], and the torch-side converters for the
calculators (numpy conversion, aggregators, dask arrays from torch datasets) in
[influx.torch.array_converters][influx.torch.array_converters]; this module re-exports them.
Nothing in the library imports it: importing `influx.torch` does not load the chunk and zarr
layer.
"""

from .array_converters import (
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
    torch_dataset_to_dask_array,
)
from .autodiff import flatten_dimensions, get_model_parameters
from .blocks import FULL_BLOCK_NAME, BlockMode, BlockStructure, block_parameters
from .compat import (
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
from .curvature import SecondOrderMode
from .validation import RegularizationType, regularization_by_block, validate_regularization

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
