"""Torch-side converters for the calculators: numpy conversion, aggregators of lazy chunk
sequences into one tensor, and dask arrays from torch datasets.

These are what [influx.calculator][influx.calculator] and [influx.array][influx.array] need to
handle torch tensors; they are also importable from
[influx.torch.util][influx.torch.util] (pyDVL's path). dask is imported only inside
[torch_dataset_to_dask_array][influx.torch.data.array_converters.torch_dataset_to_dask_array].
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Type

import numpy as np
from tqdm.auto import tqdm

import torch

from ...array import (
    LazyChunkSequence,
    ListAggregator,
    NestedLazyChunkSequence,
    NestedSequenceAggregator,
    NumpyConverter,
    SequenceAggregator,
)

if TYPE_CHECKING:  # pragma: no cover
    import dask.array

logger = logging.getLogger(__name__)

__all__ = [
    "NestedTorchCatAggregator",
    "TorchCatAggregator",
    "TorchNumpyConverter",
    "torch_dataset_to_dask_array",
]


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
    chunks of a row along its column axis (1, or 2 for per-token influences of test tokens),
    the rows along axis 0. Each row is concatenated as soon as
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
        columns = getattr(nested_sequence_of_tensors, "column_axis", 1)
        rows = [torch.cat(list(row), dim=columns) for row in rows_iter]
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


def _probe_length(dataset: Any) -> int:
    """The number of samples of a dataset without `len`: its items are read in order until an
    `IndexError` (or an empty item)."""
    logger.warning(
        "Parameter 'dataset' of type %s has no len(): reading its items once to count them; "
        "pass 'total_size' to avoid it.",
        type(dataset).__name__,
    )
    count = 0
    while True:
        try:
            item = dataset[count]
        except IndexError:
            return count
        parts = item if isinstance(item, tuple) else (item,)
        if all(torch.as_tensor(part).numel() == 0 for part in parts):
            return count
        count += 1


def torch_dataset_to_dask_array(
    dataset: Any,
    chunk_size: int,
    total_size: Optional[int] = None,
    resulting_dtype: Optional[Type[np.number]] = None,
) -> Tuple["dask.array.Array", ...]:
    """Wrap a map-style torch dataset as dask arrays, one per element of its items.

    Each chunk of `chunk_size` consecutive samples is read (and stacked) by one task, so the
    dataset is never loaded as a whole. The dataset is embedded once in the graph.

    Args:
        dataset: a dataset whose item `i` is a tensor or a tuple of tensors, e.g. a
            `TensorDataset`.
        chunk_size: samples per chunk (the last chunk may be smaller).
        total_size: the number of samples, for datasets without `len` (without it, such a
            dataset is read once, item by item, to count its samples, as pyDVL does). If
            given for a dataset with `len`, it must agree.
        resulting_dtype: the dtype of the arrays of floating-point elements; None (the
            default) keeps the dataset's own dtype (float64 samples stay float64 for a float64
            model). Integer elements (labels) keep their dtype.

    Returns:
        One dask array per element of the items, chunked along the first axis.

    Raises:
        ValueError: for a non-positive `chunk_size`, a `total_size` that disagrees with
            `len(dataset)`, or an empty dataset.
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
        n_samples = int(total_size) if total_size is not None else _probe_length(dataset)
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
        if s.is_floating_point() and resulting_dtype is not None
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
