"""Small torch helpers: block structures, regularization checks, numpy conversion,
aggregators of lazy chunk sequences and dask arrays from torch datasets.

The helpers of the reference API's `util` module that live elsewhere are reachable here too:
[flatten_dimensions][influx.torch.functional.flatten_dimensions] and
[get_model_parameters][influx.torch.functional.get_model_parameters] (from
`influx.torch.functional`), [SecondOrderMode][influx.torch.operator.SecondOrderMode] (from
`influx.torch.operator`) and the tensor-structure helpers of
[influx.torch.compat][influx.torch.compat].

dask is imported only inside [torch_dataset_to_dask_array][influx.torch.util.torch_dataset_to_dask_array].
"""

from __future__ import annotations

import math
from collections import OrderedDict
from enum import Enum
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Type, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..array import (
    LazyChunkSequence,
    ListAggregator,
    NestedLazyChunkSequence,
    NestedSequenceAggregator,
    NumpyConverter,
    SequenceAggregator,
)
from .functional import flatten_dimensions, get_model_parameters

if TYPE_CHECKING:  # pragma: no cover
    import dask.array

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
    from .operator import SecondOrderMode


_IN_COMPAT = {
    "EkfacRepresentation",
    "LossType",
    "ModelInfoMixin",
    "ModelParameterDictBuilder",
    "TorchLinalgEighException",
    "TorchTensorContainerType",
    "align_structure",
    "align_with_model",
    "empirical_cross_entropy_loss_fn",
    "reshape_vector_to_tensors",
    "safe_torch_linalg_eigh",
    "to_model_device",
}


def __getattr__(name: str) -> Any:
    # These helpers live in modules that import this one; they are reachable here, where the
    # reference API places them.
    if name in _IN_COMPAT:
        from . import compat

        return getattr(compat, name)
    if name == "SecondOrderMode":
        from .operator import SecondOrderMode

        return SecondOrderMode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockMode",
    "BlockStructure",
    "EkfacRepresentation",
    "LossType",
    "ModelInfoMixin",
    "ModelParameterDictBuilder",
    "NestedTorchCatAggregator",
    "RegularizationType",
    "SecondOrderMode",
    "TorchCatAggregator",
    "TorchLinalgEighException",
    "TorchNumpyConverter",
    "TorchTensorContainerType",
    "align_structure",
    "align_with_model",
    "block_parameters",
    "empirical_cross_entropy_loss_fn",
    "flatten_dimensions",
    "get_model_parameters",
    "regularization_by_block",
    "reshape_vector_to_tensors",
    "safe_torch_linalg_eigh",
    "to_model_device",
    "torch_dataset_to_dask_array",
    "validate_regularization",
]


class BlockMode(Enum):
    """How the parameters of a model are grouped into blocks.

    * `FULL`: one block named `"model"` with all trainable parameters.
    * `LAYER_WISE`: one block per module owning parameters, named after the module
      (e.g. `"0"`, `"fc1"`); parameters of the top-level module itself (a bare
      `nn.Linear`, say) form the block `"model"`. The curvature is block-diagonal across
      layers.
    * `PARAMETER_WISE`: one block per trainable parameter, named after it.

    A custom structure is an `OrderedDict[str, List[str]]` mapping block names to parameter
    names.
    """

    FULL = "full"
    LAYER_WISE = "layer_wise"
    PARAMETER_WISE = "parameter_wise"


BlockStructure = Union[BlockMode, "OrderedDict[str, List[str]]"]
RegularizationType = Optional[Union[float, Mapping[str, Optional[float]]]]

FULL_BLOCK_NAME = "model"


def block_parameters(
    model: torch.nn.Module, block_structure: BlockStructure
) -> "OrderedDict[str, Dict[str, torch.nn.Parameter]]":
    """Group the model's trainable parameters into named blocks.

    Raises:
        ValueError: for an unknown parameter name, an empty block, or a model without
            trainable parameters.
        TypeError: for a block structure that is neither a BlockMode nor a mapping.
    """
    params = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if not params:
        raise ValueError("Parameter 'model' has no trainable parameters (requires_grad=True).")
    blocks: "OrderedDict[str, Dict[str, torch.nn.Parameter]]" = OrderedDict()
    if block_structure is BlockMode.FULL:
        blocks[FULL_BLOCK_NAME] = dict(params)
    elif block_structure is BlockMode.PARAMETER_WISE:
        for name, p in params.items():
            blocks[name] = {name: p}
    elif block_structure is BlockMode.LAYER_WISE:
        for name, p in params.items():
            layer = name.rsplit(".", 1)[0] if "." in name else FULL_BLOCK_NAME
            blocks.setdefault(layer, {})[name] = p
    elif isinstance(block_structure, Mapping):
        for block_name, names in block_structure.items():
            if isinstance(names, str) or not names:
                raise ValueError(
                    f"Parameter 'block_structure': block {block_name!r} must be a non-empty "
                    f"list of parameter names, got {names!r}."
                )
            unknown = [n for n in names if n not in params]
            if unknown:
                raise ValueError(
                    f"Parameter 'block_structure': block {block_name!r} names unknown or "
                    f"frozen parameters {unknown}; trainable parameters are {list(params)}."
                )
            blocks[block_name] = {n: params[n] for n in names}
    else:
        raise TypeError(
            "Parameter 'block_structure' must be a BlockMode or an OrderedDict[str, List[str]], "
            f"got {type(block_structure).__name__}."
        )
    return blocks


def validate_regularization(value: Optional[float], name: str = "regularization") -> None:
    """Raise a ValueError unless `value` is None or a finite non-negative number."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Parameter '{name}' must be a float or None, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Parameter '{name}' must be a non-negative number, got {value}.")


def regularization_by_block(
    regularization: RegularizationType, block_names: List[str]
) -> Dict[str, Optional[float]]:
    """Expand a float or a dict keyed by block name into one value per block.

    Blocks missing from a dict get no regularization (None).

    Raises:
        ValueError: for negative values or keys that are not block names (the message lists
            the valid names).
    """
    if isinstance(regularization, Mapping):
        unknown = [k for k in regularization if k not in block_names]
        if unknown:
            raise ValueError(
                f"Parameter 'regularization' names unknown blocks {unknown}; valid block names "
                f"are {block_names}."
            )
        for k, v in regularization.items():
            validate_regularization(v, f"regularization[{k!r}]")
        return {name: regularization.get(name) for name in block_names}
    validate_regularization(regularization)
    return {name: regularization for name in block_names}


class TorchNumpyConverter(NumpyConverter[torch.Tensor]):
    """Converts between torch tensors and numpy arrays.

    Args:
        device: the device of the tensors made by `from_numpy` (unchanged if None).
        dtype: if given, floating-point arrays become tensors of this dtype in `from_numpy`
            (e.g. the model's dtype); integer arrays (labels) keep theirs.
    """

    def __init__(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        self.device = device
        self.dtype = dtype

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        """The values of `x` as a numpy array on the host."""
        return x.detach().cpu().numpy()

    def from_numpy(self, x: np.ndarray) -> torch.Tensor:
        """A tensor with the values of `x` (copied if `x` is read-only)."""
        array = np.asarray(x)
        if not array.flags.writeable:
            array = array.copy()
        tensor = torch.from_numpy(array)
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else None
        if self.device is not None or dtype is not None:
            tensor = tensor.to(device=self.device, dtype=dtype)
        return tensor


class TorchCatAggregator(SequenceAggregator[torch.Tensor]):
    """Concatenates the chunks of a [LazyChunkSequence][influx.array.LazyChunkSequence] along
    the first axis into one tensor.

    Args:
        progress: show a progress bar over the chunks.
    """

    def __init__(self, progress: bool = False):
        self.progress = progress

    def __call__(self, tensor_sequence: LazyChunkSequence[torch.Tensor]) -> torch.Tensor:
        chunks = ListAggregator[torch.Tensor](progress=self.progress)(tensor_sequence)
        if not chunks:
            raise ValueError("The sequence is empty: there is nothing to concatenate.")
        return torch.cat(chunks, dim=0)


class NestedTorchCatAggregator(NestedSequenceAggregator[torch.Tensor]):
    """Concatenates the chunks of a
    [NestedLazyChunkSequence][influx.array.NestedLazyChunkSequence] into one tensor: the
    chunks of a row along axis 1, the rows along axis 0. Each row is concatenated as soon as
    it is complete.

    Args:
        progress: show a progress bar over the rows of chunks.
    """

    def __init__(self, progress: bool = False):
        self.progress = progress

    def __call__(
        self, nested_sequence_of_tensors: NestedLazyChunkSequence[torch.Tensor]
    ) -> torch.Tensor:
        rows_iter = nested_sequence_of_tensors.generator_factory()
        if self.progress:
            rows_iter = tqdm(
                rows_iter, total=nested_sequence_of_tensors.len_outer_generator, desc="row chunks"
            )
        rows = [torch.cat(list(row), dim=1) for row in rows_iter]
        if not rows:
            raise ValueError("The sequence is empty: there is nothing to concatenate.")
        return torch.cat(rows, dim=0)


def _dataset_chunk(dataset: Any, start: int, stop: int) -> Tuple[torch.Tensor, ...]:
    items = [dataset[i] for i in range(start, stop)]
    columns = zip(*[item if isinstance(item, tuple) else (item,) for item in items])
    return tuple(torch.stack([torch.as_tensor(v) for v in column]) for column in columns)


def _chunk_column(
    chunk: Tuple[torch.Tensor, ...], index: int, dtype: Optional[np.dtype]
) -> np.ndarray:
    array = chunk[index].detach().cpu().numpy()
    return array if dtype is None else array.astype(dtype, copy=False)


def torch_dataset_to_dask_array(
    dataset: Any,
    chunk_size: int,
    total_size: Optional[int] = None,
    resulting_dtype: Type[np.number] = np.float32,
) -> Tuple["dask.array.Array", ...]:
    """Wrap a map-style torch dataset as dask arrays, one per element of its items.

    Each chunk of `chunk_size` consecutive samples is read (and stacked) by one task, so the
    dataset is never loaded as a whole. The dataset is embedded once in the graph.

    Args:
        dataset: a dataset whose item `i` is a tensor or a tuple of tensors, e.g. a
            `TensorDataset`.
        chunk_size: samples per chunk (the last chunk may be smaller).
        total_size: the number of samples, for datasets without `len`. If given for a
            dataset with `len`, it must agree.
        resulting_dtype: the dtype of the arrays of floating-point elements; integer elements
            (labels) keep their dtype.

    Returns:
        One dask array per element of the items, chunked along the first axis.

    Raises:
        ValueError: for a non-positive `chunk_size`, a `total_size` that disagrees with
            `len(dataset)`, or an empty dataset.
        TypeError: for a dataset without `len` and without `total_size`.
    """
    import dask
    import dask.array as da

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"Parameter 'chunk_size' must be a positive integer, got {chunk_size!r}.")
    try:
        n_samples: Optional[int] = len(dataset)
    except TypeError:
        n_samples = None
    if n_samples is None:
        if total_size is None:
            raise TypeError(
                f"Parameter 'dataset' of type {type(dataset).__name__} has no len(): pass "
                "'total_size'."
            )
        n_samples = int(total_size)
    elif total_size is not None and int(total_size) != n_samples:
        raise ValueError(
            f"Parameter 'total_size' ({total_size}) differs from len(dataset) ({n_samples})."
        )
    if n_samples < 1:
        raise ValueError("Parameter 'dataset' is empty.")
    first = dataset[0]
    sample = first if isinstance(first, tuple) else (first,)
    sample = tuple(torch.as_tensor(s) for s in sample)
    dtypes = [
        np.dtype(resulting_dtype)
        if s.is_floating_point()
        else np.dtype(str(s.dtype).removeprefix("torch."))
        for s in sample
    ]
    delayed_dataset = dask.delayed(dataset, pure=True)
    read = dask.delayed(_dataset_chunk, pure=True, nout=None)
    column = dask.delayed(_chunk_column, pure=True)
    columns: List[List[Any]] = [[] for _ in sample]
    for start in range(0, n_samples, chunk_size):
        stop = min(start + chunk_size, n_samples)
        chunk = read(delayed_dataset, start, stop)
        for k, (s, dtype) in enumerate(zip(sample, dtypes)):
            columns[k].append(
                da.from_delayed(
                    column(chunk, k, dtype), shape=(stop - start, *s.shape), dtype=dtype
                )
            )
    return tuple(da.concatenate(parts, axis=0) for parts in columns)
