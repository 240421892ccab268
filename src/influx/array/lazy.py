r"""Arrays chunked along one or two axes whose chunks are computed on demand, and the
aggregators that combine their chunks in memory.

A [LazyChunkSequence][influx.array.LazyChunkSequence] (chunks along the first axis, e.g.
influence factors) or a [NestedLazyChunkSequence][influx.array.NestedLazyChunkSequence]
(chunks along the first two axes, e.g. the influence matrix of test chunks $\times$ train
chunks) computes nothing until it is aggregated in memory (`compute`) or written chunk by chunk
to zarr (`to_zarr`, resumable).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Generic,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
)

from .chunks import (
    LazyChunk,
    LazyChunkRow,
    NumpyConverter,
    TensorType,
    materialize,
    progress_bar,
)
from .zarr_writer import ZarrChunkWriter, check_block_length, check_store_args, chunk_extents

if TYPE_CHECKING:  # pragma: no cover
    import zarr

__all__ = [
    "LazyChunkSequence",
    "ListAggregator",
    "NestedLazyChunkSequence",
    "NestedListAggregator",
    "NestedSequenceAggregator",
    "SequenceAggregator",
]


class SequenceAggregator(Generic[TensorType], ABC):
    """Combines the chunks of a [LazyChunkSequence][influx.array.LazyChunkSequence]."""

    @abstractmethod
    def __call__(self, tensor_sequence: "LazyChunkSequence[TensorType]") -> Any:
        """Compute all chunks of `tensor_sequence` and combine them."""


class ListAggregator(SequenceAggregator[TensorType]):
    """Collects the chunks into a list, in order.

    Args:
        progress: show a progress bar over the chunks.
    """

    def __init__(self, progress: bool = False):
        self.progress = progress

    def __call__(self, tensor_sequence: "LazyChunkSequence[TensorType]") -> List[TensorType]:
        chunks = progress_bar(
            tensor_sequence.generator_factory(),
            tensor_sequence.len_generator,
            "chunks",
            self.progress,
        )
        return list(chunks)


class NestedSequenceAggregator(Generic[TensorType], ABC):
    """Combines the chunks of a [NestedLazyChunkSequence][influx.array.NestedLazyChunkSequence]."""

    @abstractmethod
    def __call__(self, nested_sequence_of_tensors: "NestedLazyChunkSequence[TensorType]") -> Any:
        """Compute all chunks of `nested_sequence_of_tensors` and combine them."""


class NestedListAggregator(NestedSequenceAggregator[TensorType]):
    """Collects the chunks into a list (over row chunks) of lists (over column chunks).

    Args:
        progress: show a progress bar over the rows of chunks.
    """

    def __init__(self, progress: bool = False):
        self.progress = progress

    def __call__(
        self, nested_sequence_of_tensors: "NestedLazyChunkSequence[TensorType]"
    ) -> List[List[TensorType]]:
        rows = progress_bar(
            nested_sequence_of_tensors.generator_factory(),
            nested_sequence_of_tensors.len_outer_generator,
            "row chunks",
            self.progress,
        )
        return [list(row) for row in rows]


class LazyChunkSequence(Generic[TensorType]):
    """An array chunked along its first axis whose chunks are computed on demand.

    Args:
        generator_factory: returns a fresh iterator over the chunks, in order. It may yield
            [LazyChunk][influx.array.LazyChunk]s (computed only when needed, so that a
            resumed `to_zarr` skips completed chunks without computing them) or ready
            tensors.
        len_generator: the number of chunks, if known (for progress bars).
        metadata: what the array holds (e.g. `{"quantity": "influence_factors"}`); recorded
            in the zarr attributes by `to_zarr` and checked on resume.
        chunk_lengths: returns the lengths of all chunks without computing them (or None if
            unknown), e.g. from a data loader's batch sampler. Without it, `to_zarr` learns
            them by iterating the generator once without computing.
    """

    def __init__(
        self,
        generator_factory: Callable[[], Iterator[Any]],
        len_generator: Optional[int] = None,
        metadata: Optional[Dict[str, Any]] = None,
        chunk_lengths: Optional[Callable[[], Optional[List[int]]]] = None,
    ):
        self._chunk_factory = generator_factory
        self.len_generator = len_generator
        self.metadata = dict(metadata or {})
        self._chunk_lengths = chunk_lengths

    def generator_factory(self) -> Iterator[TensorType]:
        """A fresh iterator computing the chunks one after the other."""
        return (materialize(item) for item in self._chunk_factory())

    def compute(self, aggregator: Optional[SequenceAggregator[TensorType]] = None) -> Any:
        """Compute every chunk and combine them with `aggregator`.

        Args:
            aggregator: how to combine the chunks; a
                [ListAggregator][influx.array.ListAggregator] (a list of chunks) if None. Use
                [TorchCatAggregator][influx.torch.data.array_converters.TorchCatAggregator] for one tensor.

        Returns:
            Whatever the aggregator returns.
        """
        if aggregator is None:
            aggregator = ListAggregator()
        return aggregator(self)

    def _plan(self) -> Optional[List[int]]:
        if self._chunk_lengths is not None:
            hinted = self._chunk_lengths()
            if hinted is not None:
                return list(hinted)
        lengths = []
        for item in self._chunk_factory():
            if not isinstance(item, LazyChunk) or item.length is None:
                return None
            lengths.append(int(item.length))
        return lengths

    def to_zarr(
        self,
        path_or_url: Any,
        converter: NumpyConverter[TensorType],
        return_stored: bool = False,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = False,
    ) -> Optional["zarr.Array"]:
        """Compute the chunks one by one and write each to a zarr array as it is ready.

        Only one chunk is held in memory at a time. Each chunk is followed by a completion
        marker, so that an interrupted write can be completed with `resume=True`.

        Args:
            path_or_url: a local path, a URL understood by zarr (fsspec), or a zarr store.
            converter: converts a chunk to a numpy array.
            return_stored: return the zarr array.
            overwrite: replace an existing array at `path_or_url`.
            resume: complete an array that an earlier, interrupted call of the same
                computation started: chunks with a completion marker are neither computed
                nor written again. Without an array at `path_or_url`, start a new one.
            progress: show a progress bar over the chunks.

        Returns:
            The zarr array if `return_stored`, else None.

        Raises:
            ValueError: if an array exists at `path_or_url` and neither `overwrite` nor
                `resume` is set; if on resume the stored array does not match this
                computation (quantity, mode, chunk lengths, shape or dtype); if the sequence
                is empty.
        """
        check_store_args(overwrite, resume)
        plan = self._plan()
        writer = ZarrChunkWriter(
            path_or_url,
            planned_lengths=None if plan is None else (plan,),
            metadata=self.metadata,
            overwrite=overwrite,
            resume=resume,
        )
        offset = 0
        n_chunks = 0
        items = progress_bar(self._chunk_factory(), self.len_generator, "chunks", progress)
        for index, item in enumerate(items):
            length = item.length if isinstance(item, LazyChunk) else None
            if length is not None and writer.is_done((index,), ((offset, offset + length),)):
                offset += length
                n_chunks += 1
                continue
            block = converter.to_numpy(materialize(item))
            check_block_length(block, 0, length, (index,))
            extent = ((offset, offset + block.shape[0]),)
            if not writer.is_done((index,), extent):
                writer.write((index,), extent, block)
            offset += block.shape[0]
            n_chunks += 1
        if n_chunks == 0:
            raise ValueError("The sequence is empty: its generator yielded no chunk to write.")
        array = writer.finish((offset,))
        return array if return_stored else None


class NestedLazyChunkSequence(Generic[TensorType]):
    """An array chunked along its first two axes whose chunks are computed on demand.

    Args:
        generator_factory: returns a fresh iterator over the rows of chunks; each row is an
            iterable over the row's chunks, left to right
            ([LazyChunkRow][influx.array.LazyChunkRow]s of
            [LazyChunk][influx.array.LazyChunk]s let a resumed `to_zarr` skip completed chunks
            without computing them).
        len_outer_generator: the number of rows of chunks, if known (for progress bars).
        metadata: what the array holds (e.g. `{"quantity": "influences", "mode": "up"}`);
            recorded in the zarr attributes by `to_zarr` and checked on resume.
        chunk_lengths: returns the lengths of the chunks along the row and column axes
            without computing them (or None if unknown). Without it, `to_zarr` learns them by
            iterating the rows, and the chunks of the first row, once without computing.
        token_axis: the axis of per-token influences that holds the tokens, whole in every
            chunk (recorded in the metadata): 1 puts the columns on axis 2
            (`(N_test, T, N)`), 2 keeps them on axis 1 (`(N_test, N, T)`).
    """

    def __init__(
        self,
        generator_factory: Callable[[], Iterator[Iterable[Any]]],
        len_outer_generator: Optional[int] = None,
        metadata: Optional[Dict[str, Any]] = None,
        chunk_lengths: Optional[Callable[[], Optional[Tuple[List[int], List[int]]]]] = None,
        token_axis: Optional[int] = None,
    ):
        self._row_factory = generator_factory
        self.len_outer_generator = len_outer_generator
        self.metadata = dict(metadata or {})
        if token_axis is not None:
            self.metadata["token_axis"] = int(token_axis)
        self._chunk_lengths = chunk_lengths

    @property
    def column_axis(self) -> int:
        """The axis of a chunk along which the columns (e.g. training points) lie: 1, or 2
        when axis 1 holds the tokens."""
        return 2 if self.metadata.get("token_axis") == 1 else 1

    def generator_factory(self) -> Iterator[Iterator[TensorType]]:
        """A fresh iterator over rows; each row is an iterator computing its chunks."""
        return ((materialize(item) for item in row) for row in self._row_factory())

    def compute(self, aggregator: Optional[NestedSequenceAggregator[TensorType]] = None) -> Any:
        """Compute every chunk and combine them with `aggregator`.

        Args:
            aggregator: how to combine the chunks; a
                [NestedListAggregator][influx.array.NestedListAggregator] (a list of lists of
                chunks) if None. Use
                [NestedTorchCatAggregator][influx.torch.data.array_converters.NestedTorchCatAggregator] for one
                tensor.

        Returns:
            Whatever the aggregator returns.
        """
        if aggregator is None:
            aggregator = NestedListAggregator()
        return aggregator(self)

    def _plan(self) -> Optional[Tuple[List[int], List[int]]]:
        if self._chunk_lengths is not None:
            hinted = self._chunk_lengths()
            if hinted is not None:
                return list(hinted[0]), list(hinted[1])
        row_lengths: List[int] = []
        column_lengths: Optional[List[int]] = None
        for row in self._row_factory():
            length = getattr(row, "length", None)
            if not isinstance(row, LazyChunkRow) or length is None:
                return None
            row_lengths.append(int(length))
            if column_lengths is None:
                column_lengths = []
                for item in row:
                    if not isinstance(item, LazyChunk) or item.length is None:
                        return None
                    column_lengths.append(int(item.length))
        if not row_lengths or not column_lengths:
            return None
        return row_lengths, column_lengths

    def to_zarr(
        self,
        path_or_url: Any,
        converter: NumpyConverter[TensorType],
        return_stored: bool = False,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = False,
    ) -> Optional["zarr.Array"]:
        """Compute the chunks one by one and write each to a zarr array as it is ready.

        Only one chunk (and, for influences, the factors of one test chunk) is held in
        memory at a time. Each chunk is followed by a completion marker, so that an
        interrupted write can be completed with `resume=True`: rows whose chunks are all
        complete are skipped without reading their data, and a test chunk's factors are
        computed only if one of its chunks is missing.

        Args:
            path_or_url: a local path, a URL understood by zarr (fsspec), or a zarr store.
            converter: converts a chunk to a numpy array.
            return_stored: return the zarr array.
            overwrite: replace an existing array at `path_or_url`.
            resume: complete an array that an earlier, interrupted call of the same
                computation started: chunks with a completion marker are neither computed
                nor written again. Without an array at `path_or_url`, start a new one.
            progress: show a progress bar over the rows of chunks.

        Returns:
            The zarr array if `return_stored`, else None.

        Raises:
            ValueError: if an array exists at `path_or_url` and neither `overwrite` nor
                `resume` is set; if on resume the stored array does not match this
                computation (quantity, mode, chunk lengths, shape or dtype); if the rows do
                not all have the same column chunks; if the sequence is empty.
        """
        check_store_args(overwrite, resume)
        plan = self._plan()
        columns = self.column_axis
        writer = ZarrChunkWriter(
            path_or_url,
            planned_lengths=plan,
            metadata=self.metadata,
            overwrite=overwrite,
            resume=resume,
            axes=(0, columns),
        )
        row_offset = 0
        n_columns: Optional[int] = None
        rows = progress_bar(self._row_factory(), self.len_outer_generator, "row chunks", progress)
        for i, row in enumerate(rows):
            row_length = getattr(row, "length", None)
            if plan is not None and row_length is not None:
                if all(
                    writer.is_done((i, j), ((row_offset, row_offset + row_length), extent))
                    for j, extent in enumerate(chunk_extents(plan[1]))
                ):
                    row_offset += row_length
                    continue
            col_offset = 0
            j = -1
            for j, item in enumerate(row):
                length = item.length if isinstance(item, LazyChunk) else None
                if length is not None and row_length is not None:
                    extent = (
                        (row_offset, row_offset + row_length),
                        (col_offset, col_offset + length),
                    )
                    if writer.is_done((i, j), extent):
                        col_offset += length
                        continue
                block = converter.to_numpy(materialize(item))
                if block.ndim < columns + 1:
                    raise ValueError(
                        f"Chunk ({i}, {j}) must have at least {columns + 1} dimensions, got "
                        f"shape {block.shape}."
                    )
                check_block_length(block, 0, row_length, (i, j))
                check_block_length(block, columns, length, (i, j))
                row_length = block.shape[0]
                extent = (
                    (row_offset, row_offset + block.shape[0]),
                    (col_offset, col_offset + block.shape[columns]),
                )
                if not writer.is_done((i, j), extent):
                    writer.write((i, j), extent, block)
                col_offset += block.shape[columns]
            if j < 0:
                raise ValueError(f"Row {i} of the nested sequence has no chunk.")
            if n_columns is None:
                n_columns = col_offset
            elif col_offset != n_columns:
                raise ValueError(
                    f"Row {i} of the nested sequence has {col_offset} columns, row 0 has "
                    f"{n_columns}: every row must cover the same columns (is the train data "
                    "iterable deterministic?)."
                )
            if row_length is None:  # pragma: no cover - a row with chunks has a length
                raise ValueError(f"Row {i} has no length.")
            row_offset += row_length
        if n_columns is None:
            if plan is None or row_offset == 0:
                raise ValueError("The sequence is empty: its generator yielded no row.")
            n_columns = sum(plan[1])
        array = writer.finish((row_offset, n_columns))
        return array if return_stored else None
