"""Chunks computed on demand and converters to numpy.

The building blocks of the lazy sequences in [influx.array][influx.array]: a
[LazyChunk][influx.array.LazyChunk] is a chunk that is computed only when asked for, a
[LazyChunkRow][influx.array.LazyChunkRow] a row of them, and a
[NumpyConverter][influx.array.NumpyConverter] turns a framework's tensors into numpy arrays
(for zarr and dask) and back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import (
    Any,
    Callable,
    Generic,
    Iterable,
    Iterator,
    Optional,
    TypeVar,
    Union,
)

from numpy.typing import NDArray
from tqdm.auto import tqdm

__all__ = [
    "LazyChunk",
    "LazyChunkRow",
    "NumpyConverter",
    "TensorType",
    "materialize",
    "progress_bar",
]

TensorType = TypeVar("TensorType")


class NumpyConverter(Generic[TensorType], ABC):
    """Converts between a framework's tensors and numpy arrays (for zarr and dask)."""

    @abstractmethod
    def to_numpy(self, x: TensorType) -> NDArray:
        """A numpy array with the values of `x` (on the host)."""

    @abstractmethod
    def from_numpy(self, x: NDArray) -> TensorType:
        """A tensor with the values of `x`."""


class LazyChunk(Generic[TensorType]):
    """One chunk that is computed only when asked for.

    Args:
        compute: a function without arguments that returns the chunk.
        length: the chunk's length along the chunked axis (axis 0 for a
            [LazyChunkSequence][influx.array.LazyChunkSequence], axis 1 for a chunk in a row
            of a [NestedLazyChunkSequence][influx.array.NestedLazyChunkSequence]), when known
            without computing it. It lets `to_zarr` plan the whole array and skip completed
            chunks on resume without computing them.
    """

    __slots__ = ("_compute", "length")

    def __init__(self, compute: Callable[[], TensorType], length: Optional[int] = None):
        self._compute = compute
        self.length = length

    def compute(self) -> TensorType:
        """Compute and return the chunk."""
        return self._compute()


class LazyChunkRow(Generic[TensorType]):
    """One row of chunks of a [NestedLazyChunkSequence][influx.array.NestedLazyChunkSequence].

    Iterating it yields the row's chunks ([LazyChunk][influx.array.LazyChunk]s or tensors),
    left to right. Nothing is computed before a chunk is asked for.

    Args:
        chunks_factory: returns a fresh iterator over the row's chunks.
        length: the number of rows (the length along axis 0) of every chunk of the row, when
            known without computing.
    """

    def __init__(
        self,
        chunks_factory: Callable[[], Iterator[Union[LazyChunk[TensorType], TensorType]]],
        length: Optional[int] = None,
    ):
        self.chunks_factory = chunks_factory
        self.length = length

    def __iter__(self) -> Iterator[Union[LazyChunk[TensorType], TensorType]]:
        return iter(self.chunks_factory())


def materialize(item: Any) -> Any:
    """The chunk itself: computed if `item` is a [LazyChunk][influx.array.LazyChunk]."""
    return item.compute() if isinstance(item, LazyChunk) else item


def progress_bar(iterable: Iterable[Any], total: Optional[int], desc: str, enabled: bool) -> Any:
    """`iterable` wrapped in a `tqdm` progress bar if `enabled`, else unchanged."""
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc)
