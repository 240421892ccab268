r"""Lazily evaluated chunked arrays, aggregators and zarr output that survives interruption.

The calculators in [influx.calculator][influx.calculator] do not compute anything when they
are called: they return a [LazyChunkSequence][influx.array.LazyChunkSequence] (chunks along
the first axis, e.g. influence factors) or a
[NestedLazyChunkSequence][influx.array.NestedLazyChunkSequence] (chunks along the first two
axes, e.g. the influence matrix of test chunks $\times$ train chunks). The computation runs
when the sequence is

* aggregated in memory with [compute][influx.array.LazyChunkSequence.compute] and an
  aggregator (a list of chunks, or one concatenated tensor), or
* written chunk by chunk to a zarr (v3) array with
  [to_zarr][influx.array.LazyChunkSequence.to_zarr], holding one chunk in memory at a time.

**Interrupted writes.** `to_zarr` writes each chunk as soon as it is computed and only then
stores a small completion marker for it (a key `influx_done/<i>.<j>` inside the array's own
prefix of the store, holding the chunk's extent). A chunk whose data was half-written when
the process died has no marker. Running the same `to_zarr` again with `resume=True` checks
that the stored array was produced by the same kind of computation (quantity, mode, chunk
lengths, dtype and shape) and computes and writes only the chunks without a marker. The
array's attributes (key `"influx"`) record the quantity, the influence mode, the chunk
lengths, the library version and whether the write is `complete`; see
[zarr_write_status][influx.array.zarr_write_status].

zarr and dask are imported only when needed: importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
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
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

if TYPE_CHECKING:  # pragma: no cover
    import dask.array
    import zarr

__all__ = [
    "LazyChunk",
    "LazyChunkRow",
    "LazyChunkSequence",
    "ListAggregator",
    "NestedLazyChunkSequence",
    "NestedListAggregator",
    "NestedSequenceAggregator",
    "NumpyConverter",
    "SequenceAggregator",
    "ZarrWriteStatus",
    "dask_array_to_zarr",
    "zarr_write_status",
]

logger = logging.getLogger(__name__)

TensorType = TypeVar("TensorType")

ATTRIBUTE_KEY = "influx"
"""The key of the array attribute where influx records what the array holds."""
MARKER_PREFIX = "influx_done"
"""The prefix (inside the array's prefix in the store) of the completion markers."""
FORMAT_VERSION = 1

Extent = Tuple[Tuple[int, int], ...]
ChunkIndex = Tuple[int, ...]


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


def _materialize(item: Any) -> Any:
    return item.compute() if isinstance(item, LazyChunk) else item


def _progress(iterable: Iterable[Any], total: Optional[int], desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc)


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
        chunks = _progress(
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
        rows = _progress(
            nested_sequence_of_tensors.generator_factory(),
            nested_sequence_of_tensors.len_outer_generator,
            "row chunks",
            self.progress,
        )
        return [list(row) for row in rows]


def _check_store_args(overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise ValueError(
            "Parameters 'overwrite' and 'resume' are mutually exclusive: 'overwrite=True' "
            "replaces an existing array, 'resume=True' completes it; got both True."
        )


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
        return (_materialize(item) for item in self._chunk_factory())

    def compute(self, aggregator: Optional[SequenceAggregator[TensorType]] = None) -> Any:
        """Compute every chunk and combine them with `aggregator`.

        Args:
            aggregator: how to combine the chunks; a
                [ListAggregator][influx.array.ListAggregator] (a list of chunks) if None. Use
                [TorchCatAggregator][influx.torch.util.TorchCatAggregator] for one tensor.

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
        _check_store_args(overwrite, resume)
        plan = self._plan()
        writer = _ZarrChunkWriter(
            path_or_url,
            planned_lengths=None if plan is None else (plan,),
            metadata=self.metadata,
            overwrite=overwrite,
            resume=resume,
        )
        offset = 0
        n_chunks = 0
        items = _progress(self._chunk_factory(), self.len_generator, "chunks", progress)
        for index, item in enumerate(items):
            length = item.length if isinstance(item, LazyChunk) else None
            if length is not None and writer.is_done((index,), ((offset, offset + length),)):
                offset += length
                n_chunks += 1
                continue
            block = converter.to_numpy(_materialize(item))
            _check_block_length(block, 0, length, (index,))
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
        chunk_lengths: returns the lengths of the chunks along axes 0 and 1 without
            computing them (or None if unknown). Without it, `to_zarr` learns them by
            iterating the rows, and the chunks of the first row, once without computing.
    """

    def __init__(
        self,
        generator_factory: Callable[[], Iterator[Iterable[Any]]],
        len_outer_generator: Optional[int] = None,
        metadata: Optional[Dict[str, Any]] = None,
        chunk_lengths: Optional[Callable[[], Optional[Tuple[List[int], List[int]]]]] = None,
    ):
        self._row_factory = generator_factory
        self.len_outer_generator = len_outer_generator
        self.metadata = dict(metadata or {})
        self._chunk_lengths = chunk_lengths

    def generator_factory(self) -> Iterator[Iterator[TensorType]]:
        """A fresh iterator over rows; each row is an iterator computing its chunks."""
        return ((_materialize(item) for item in row) for row in self._row_factory())

    def compute(self, aggregator: Optional[NestedSequenceAggregator[TensorType]] = None) -> Any:
        """Compute every chunk and combine them with `aggregator`.

        Args:
            aggregator: how to combine the chunks; a
                [NestedListAggregator][influx.array.NestedListAggregator] (a list of lists of
                chunks) if None. Use
                [NestedTorchCatAggregator][influx.torch.util.NestedTorchCatAggregator] for one
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
        _check_store_args(overwrite, resume)
        plan = self._plan()
        writer = _ZarrChunkWriter(
            path_or_url,
            planned_lengths=plan,
            metadata=self.metadata,
            overwrite=overwrite,
            resume=resume,
        )
        row_offset = 0
        n_columns: Optional[int] = None
        rows = _progress(self._row_factory(), self.len_outer_generator, "row chunks", progress)
        for i, row in enumerate(rows):
            row_length = getattr(row, "length", None)
            if plan is not None and row_length is not None:
                if all(
                    writer.is_done((i, j), ((row_offset, row_offset + row_length), extent))
                    for j, extent in enumerate(_extents(plan[1]))
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
                block = converter.to_numpy(_materialize(item))
                if block.ndim < 2:
                    raise ValueError(
                        f"Chunk ({i}, {j}) must have at least 2 dimensions, got shape "
                        f"{block.shape}."
                    )
                _check_block_length(block, 0, row_length, (i, j))
                _check_block_length(block, 1, length, (i, j))
                row_length = block.shape[0]
                extent = (
                    (row_offset, row_offset + block.shape[0]),
                    (col_offset, col_offset + block.shape[1]),
                )
                if not writer.is_done((i, j), extent):
                    writer.write((i, j), extent, block)
                col_offset += block.shape[1]
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


def _extents(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _check_block_length(
    block: NDArray, axis: int, expected: Optional[int], index: ChunkIndex
) -> None:
    if expected is not None and block.shape[axis] != expected:
        raise ValueError(
            f"Chunk {index} has length {block.shape[axis]} along axis {axis}, but its "
            f"data announced {expected}."
        )


def _zarr_version() -> str:
    from . import __version__

    return __version__


def _open_existing(path_or_url: Any) -> Optional["zarr.Array"]:
    import zarr

    try:
        return zarr.open_array(store=path_or_url, mode="r+")
    except (FileNotFoundError, KeyError):
        return None


def _marker_key(array: "zarr.Array", index: ChunkIndex) -> str:
    name = ".".join(str(i) for i in index)
    prefix = f"{array.path}/" if array.path else ""
    return f"{prefix}{MARKER_PREFIX}/{name}"


def _write_marker(array: "zarr.Array", index: ChunkIndex, extent: Extent) -> None:
    """Record that chunk `index` with `extent` is completely written (after its data)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    payload = json.dumps({"extent": [list(e) for e in extent]}).encode()
    buffer = default_buffer_prototype().buffer.from_bytes(payload)
    sync(array.store.set(_marker_key(array, index), buffer))


def _read_markers(array: "zarr.Array") -> Dict[ChunkIndex, Extent]:
    """The completed chunks of `array` with their extents (unreadable markers are ignored)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    prefix = f"{array.path}/{MARKER_PREFIX}/" if array.path else f"{MARKER_PREFIX}/"
    store = array.store

    async def _collect() -> Dict[ChunkIndex, Extent]:
        found: Dict[ChunkIndex, Extent] = {}
        prototype = default_buffer_prototype()
        async for key in store.list_prefix(prefix):
            name = key[len(prefix) :]
            try:
                index = tuple(int(part) for part in name.split("."))
                raw = await store.get(key, prototype=prototype)
                if raw is None:
                    continue
                extent = tuple(
                    tuple(int(v) for v in e) for e in json.loads(raw.to_bytes())["extent"]
                )
            except (ValueError, KeyError, TypeError):
                logger.warning("Ignoring an unreadable completion marker %r.", key)
                continue
            found[index] = extent  # type: ignore[assignment]
        return found

    return sync(_collect())  # type: ignore[no-any-return]


@dataclass
class ZarrWriteStatus:
    """How far an influx write to a zarr array got.

    Attributes:
        complete: whether the write finished (every chunk written, shape final).
        n_completed_chunks: the number of chunks with a completion marker.
        n_chunks: the planned number of chunks, None if it was not known in advance.
        missing_chunks: indices of planned chunks without a completion marker (empty if
            the plan is unknown).
        metadata: the recorded attributes (quantity, mode, chunk lengths, library version).
    """

    complete: bool
    n_completed_chunks: int
    n_chunks: Optional[int]
    missing_chunks: List[ChunkIndex] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)


def _planned_indices(
    chunk_lengths: Optional[Sequence[Sequence[int]]],
) -> Optional[List[ChunkIndex]]:
    if chunk_lengths is None:
        return None
    grids = [range(len(lengths)) for lengths in chunk_lengths]
    return [tuple(int(v) for v in idx) for idx in np.ndindex(*[len(g) for g in grids])]


def zarr_write_status(path_or_url: Any) -> ZarrWriteStatus:
    """Inspect an array written by `to_zarr` (or [dask_array_to_zarr][influx.array.dask_array_to_zarr]).

    Args:
        path_or_url: the array's path, URL or store.

    Raises:
        FileNotFoundError: if there is no array.
        ValueError: if the array was not written by influx.
    """
    import zarr

    array = zarr.open_array(store=path_or_url, mode="r")
    recorded = array.attrs.get(ATTRIBUTE_KEY)
    metadata: Dict[str, Any] = dict(recorded) if isinstance(recorded, dict) else {}
    if not metadata:
        raise ValueError(
            f"The zarr array at {path_or_url!r} has no {ATTRIBUTE_KEY!r} attributes: it was "
            "not written by influx."
        )
    done = _read_markers(array)
    planned = _planned_indices(metadata.get("chunk_lengths"))
    missing = [] if planned is None else [idx for idx in planned if idx not in done]
    return ZarrWriteStatus(
        complete=bool(metadata.get("complete", False)),
        n_completed_chunks=len(done),
        n_chunks=None if planned is None else len(planned),
        missing_chunks=missing,
        metadata=metadata,
    )


class _ZarrChunkWriter:
    """Creates, validates and fills a zarr array chunk by chunk, with completion markers."""

    def __init__(
        self,
        path_or_url: Any,
        planned_lengths: Optional[Sequence[Sequence[int]]],
        metadata: Dict[str, Any],
        overwrite: bool,
        resume: bool,
    ):
        self.path_or_url = path_or_url
        self.planned_lengths = (
            None if planned_lengths is None else [list(map(int, p)) for p in planned_lengths]
        )
        self.metadata = dict(metadata)
        self.overwrite = overwrite
        self.array: Optional["zarr.Array"] = None
        self.done: Dict[ChunkIndex, Extent] = {}
        existing = None if overwrite else _open_existing(path_or_url)
        if existing is not None and not resume:
            raise ValueError(
                f"An array exists at {path_or_url!r}: pass overwrite=True to replace it, or "
                "resume=True to complete an interrupted write of the same computation."
            )
        if existing is not None:
            self._validate_existing(existing)
            self.array = existing
            self.done = _read_markers(existing)
            logger.info(
                "Resuming the zarr write at %r: %d chunks already complete.",
                path_or_url,
                len(self.done),
            )

    def _attributes(self, complete: bool) -> Dict[str, Any]:
        return {
            ATTRIBUTE_KEY: {
                **self.metadata,
                "format_version": FORMAT_VERSION,
                "library_version": _zarr_version(),
                "chunk_lengths": self.planned_lengths,
                "complete": complete,
            }
        }

    def _validate_existing(self, array: "zarr.Array") -> None:
        recorded = array.attrs.get(ATTRIBUTE_KEY)
        if not isinstance(recorded, dict):
            raise ValueError(
                f"Cannot resume: the array at {self.path_or_url!r} was not written by influx "
                f"(no {ATTRIBUTE_KEY!r} attributes); pass overwrite=True to replace it."
            )
        for key, value in self.metadata.items():
            if recorded.get(key) != value:
                raise ValueError(
                    f"Cannot resume: the array at {self.path_or_url!r} holds {key}="
                    f"{recorded.get(key)!r}, this computation has {key}={value!r}."
                )
        stored_plan = recorded.get("chunk_lengths")
        if stored_plan is not None and self.planned_lengths is not None:
            if [list(p) for p in stored_plan] != self.planned_lengths:
                raise ValueError(
                    f"Cannot resume: the array at {self.path_or_url!r} was written with chunk "
                    f"lengths {_summary(stored_plan)}, this computation has "
                    f"{_summary(self.planned_lengths)} (did the data or the chunk size change?)."
                )
            expected = tuple(sum(p) for p in self.planned_lengths)
            if tuple(array.shape[: len(expected)]) != expected:
                raise ValueError(
                    f"Cannot resume: the array at {self.path_or_url!r} has shape "
                    f"{array.shape}, this computation needs leading dimensions {expected}."
                )

    def is_done(self, index: ChunkIndex, extent: Extent) -> bool:
        stored = self.done.get(index)
        if stored is None:
            return False
        if tuple(tuple(e) for e in stored) != tuple(tuple(e) for e in extent):
            raise ValueError(
                f"Cannot resume: chunk {index} covers {[list(e) for e in extent]} now but "
                f"{[list(e) for e in stored]} in the stored array (did the data change?)."
            )
        return True

    def _create(self, extent: Extent, block: NDArray) -> "zarr.Array":
        import zarr

        k = len(extent)
        if self.planned_lengths is not None:
            leading = tuple(sum(p) for p in self.planned_lengths)
            chunk_leading = tuple(max(p) for p in self.planned_lengths)
        else:
            leading = tuple(e[1] for e in extent)
            chunk_leading = tuple(block.shape[:k])
        shape = leading + tuple(block.shape[k:])
        chunks = tuple(max(c, 1) for c in chunk_leading + tuple(block.shape[k:]))
        return zarr.open_array(
            store=self.path_or_url,
            mode="w" if self.overwrite else "w-",
            shape=shape,
            chunks=chunks,
            dtype=block.dtype,
            attributes=self._attributes(complete=False),
        )

    def write(self, index: ChunkIndex, extent: Extent, block: NDArray) -> None:
        k = len(extent)
        if self.array is None:
            self.array = self._create(extent, block)
        array = self.array
        if block.dtype != array.dtype or tuple(block.shape[k:]) != tuple(array.shape[k:]):
            raise ValueError(
                f"Chunk {index} has dtype {block.dtype} and trailing shape {block.shape[k:]}, "
                f"the array at {self.path_or_url!r} has dtype {array.dtype} and trailing shape "
                f"{array.shape[k:]}."
            )
        needed = tuple(max(e[1], s) for e, s in zip(extent, array.shape[:k]))
        if needed != tuple(array.shape[:k]):
            if self.planned_lengths is not None:
                raise ValueError(
                    f"Chunk {index} reaches {needed}, beyond the planned shape {array.shape}."
                )
            array.resize(needed + tuple(array.shape[k:]))
        array[tuple(slice(a, b) for a, b in extent)] = block
        _write_marker(array, index, extent)
        self.done[index] = extent

    def finish(self, leading_shape: Tuple[int, ...]) -> "zarr.Array":
        array = self.array
        if array is None:
            raise ValueError("Nothing was written: the sequence produced no chunk.")
        k = len(leading_shape)
        if tuple(array.shape[:k]) != tuple(leading_shape):
            if self.planned_lengths is not None:
                raise ValueError(
                    f"The data covered {leading_shape}, the planned array has shape "
                    f"{array.shape} (did the data change while writing?)."
                )
            array.resize(tuple(leading_shape) + tuple(array.shape[k:]))
        attributes = self._attributes(complete=True)
        if self.planned_lengths is None:
            lengths: List[List[int]] = [[] for _ in range(k)]
            for axis in range(k):
                bounds = sorted({e[axis] for e in self.done.values()})
                lengths[axis] = [b - a for a, b in bounds]
            attributes[ATTRIBUTE_KEY]["chunk_lengths"] = lengths
        array.attrs.update(attributes)
        return array


def _summary(lengths: Sequence[Sequence[int]]) -> str:
    parts = []
    for p in lengths:
        p = list(p)
        parts.append(f"{len(p)} chunks of {p[:3]}{'...' if len(p) > 3 else ''} (sum {sum(p)})")
    return "; ".join(parts)


def _write_dask_block(
    block: NDArray, array: "zarr.Array", index: ChunkIndex, extent: Extent
) -> int:
    array[tuple(slice(a, b) for a, b in extent)] = block
    _write_marker(array, index, extent)
    return 1


def dask_array_to_zarr(
    array: "dask.array.Array",
    path_or_url: Any,
    overwrite: bool = False,
    resume: bool = False,
    metadata: Optional[Dict[str, Any]] = None,
    return_stored: bool = False,
    progress: bool = False,
) -> Optional["zarr.Array"]:
    """Compute a dask array block by block and write it to zarr, resumably.

    Every block is written by the task that computes it, followed by its completion marker,
    in the same format as [LazyChunkSequence.to_zarr][influx.array.LazyChunkSequence.to_zarr].
    A task lost with its worker is recomputed and rewritten by the scheduler; after an
    interruption of the whole computation, calling this again with `resume=True` computes
    only the blocks without a marker (shared inputs such as influence factors are computed
    once for all of them).

    Args:
        array: the dask array; chunked along at most its first two axes, with regular chunks
            (all of the same length except the last) along each chunked axis, so that no two
            blocks share a zarr chunk.
        path_or_url: a local path, a URL understood by zarr, or a zarr store that the workers
            can reach (not an in-memory store with a distributed scheduler).
        overwrite: replace an existing array.
        resume: complete an interrupted write; blocks with a marker are skipped.
        metadata: what the array holds, recorded in its attributes and checked on resume
            (e.g. the `zarr_metadata` attribute of the calculators' results).
        return_stored: return the zarr array.
        progress: show a progress bar over the blocks.

    Returns:
        The zarr array if `return_stored`, else None.

    Raises:
        ValueError: for irregular chunks, chunks along a third axis, an existing array
            without `overwrite` or `resume`, or a stored array that does not match.
    """
    import dask

    _check_store_args(overwrite, resume)
    if metadata is None:
        metadata = dict(getattr(array, "zarr_metadata", None) or {})
    n_chunked = max(1, min(2, array.ndim))
    for axis, chunks in enumerate(array.chunks):
        if axis >= n_chunked and len(chunks) > 1:
            raise ValueError(
                f"Parameter 'array' may be chunked along its first {n_chunked} axes only, got "
                f"{len(chunks)} chunks along axis {axis}; rechunk it first."
            )
        irregular = len(set(chunks[:-1])) > 1 or (len(chunks) > 1 and chunks[-1] > chunks[0])
        if axis < n_chunked and irregular:
            raise ValueError(
                f"Parameter 'array' must have regular chunks along axis {axis} (all equal "
                f"but a smaller last one), got {chunks}; rechunk it first."
            )
    planned = [list(map(int, array.chunks[a])) for a in range(n_chunked)]
    writer = _ZarrChunkWriter(
        path_or_url,
        planned_lengths=planned,
        metadata=metadata,
        overwrite=overwrite,
        resume=resume,
    )
    if writer.array is None:
        import zarr

        chunk_shape = tuple(max(c[0], 1) for c in array.chunks)
        writer.array = zarr.open_array(
            store=path_or_url,
            mode="w" if overwrite else "w-",
            shape=array.shape,
            chunks=chunk_shape,
            dtype=array.dtype,
            attributes=writer._attributes(complete=False),
        )
    elif writer.array.dtype != array.dtype or tuple(writer.array.shape) != tuple(array.shape):
        raise ValueError(
            f"Cannot resume: the array at {path_or_url!r} has shape {writer.array.shape} and "
            f"dtype {writer.array.dtype}, this computation has shape {array.shape} and dtype "
            f"{array.dtype}."
        )
    target = writer.array
    extents = [_extents(p) for p in planned]
    blocks = array.to_delayed()
    tasks = []
    for index in np.ndindex(*[len(p) for p in planned]):
        index = tuple(int(i) for i in index)
        extent = tuple(extents[a][index[a]] for a in range(n_chunked))
        if writer.is_done(index, extent):
            continue
        block = blocks[index + (0,) * (array.ndim - n_chunked)]
        tasks.append(dask.delayed(_write_dask_block)(block, target, index, extent))
    logger.info("Writing %d blocks to %r.", len(tasks), path_or_url)
    if tasks:
        if progress:
            from dask.diagnostics import ProgressBar

            try:
                from distributed import default_client

                client = default_client()
            except (ImportError, ValueError):
                client = None
            if client is not None:
                futures = client.compute(tasks)
                from distributed import as_completed

                for _ in tqdm(as_completed(futures), total=len(futures), desc="blocks"):
                    pass
                client.gather(futures)
            else:
                with ProgressBar():
                    dask.compute(*tasks)
        else:
            dask.compute(*tasks)
    written = _read_markers(target)
    missing = [
        idx for idx in np.ndindex(*[len(p) for p in planned]) if tuple(map(int, idx)) not in written
    ]
    if missing:  # pragma: no cover - the scheduler raises for failed tasks
        raise RuntimeError(f"{len(missing)} blocks were not written, e.g. {missing[:3]}.")
    writer.done = written
    array_out = writer.finish(tuple(array.shape[:n_chunked]))
    return array_out if return_stored else None
