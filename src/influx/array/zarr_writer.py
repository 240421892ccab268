"""Writing chunks to zarr with completion markers, from a sequence or a dask array.

[ZarrChunkWriter][influx.array.zarr_writer.ZarrChunkWriter] creates, validates (on resume) and
fills an array chunk by chunk in the format of [influx.array.status][influx.array.status];
[dask_array_to_zarr][influx.array.dask_array_to_zarr] lets every task of a dask array write its
own block.

zarr and dask are imported only inside the functions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from .status import (
    ATTRIBUTE_KEY,
    FORMAT_VERSION,
    ChunkIndex,
    Extent,
    library_version,
    read_markers,
    write_marker,
)

if TYPE_CHECKING:  # pragma: no cover
    import dask.array
    import zarr

__all__ = [
    "ZarrChunkWriter",
    "check_block_length",
    "check_store_args",
    "chunk_extents",
    "dask_array_to_zarr",
    "sample_axes",
]

logger = logging.getLogger(__name__)


def check_store_args(overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise ValueError(
            "Parameters 'overwrite' and 'resume' are mutually exclusive: 'overwrite=True' "
            "replaces an existing array, 'resume=True' completes it; got both True."
        )


def chunk_extents(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def check_block_length(
    block: NDArray, axis: int, expected: Optional[int], index: ChunkIndex
) -> None:
    if expected is not None and block.shape[axis] != expected:
        raise ValueError(
            f"Chunk {index} has length {block.shape[axis]} along axis {axis}, but its "
            f"data announced {expected}."
        )


def _open_existing(path_or_url: Any) -> Optional["zarr.Array"]:
    import zarr

    try:
        return zarr.open_array(store=path_or_url, mode="r+")
    except (FileNotFoundError, KeyError):
        return None


class ZarrChunkWriter:
    """Creates, validates and fills a zarr array chunk by chunk, with completion markers.

    The extent of a chunk covers the chunked axes: the first ones, or `axes` (e.g. `(0, 2)`
    for per-token influences of test tokens, `(N_test, T, N)`, whose token axis is whole).
    """

    def __init__(
        self,
        path_or_url: Any,
        planned_lengths: Optional[Sequence[Sequence[int]]],
        metadata: Dict[str, Any],
        overwrite: bool,
        resume: bool,
        axes: Optional[Sequence[int]] = None,
    ):
        self.path_or_url = path_or_url
        self.axes = None if axes is None else tuple(int(a) for a in axes)
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
            self.done = read_markers(existing)
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
                "library_version": library_version(),
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
            if self._chunked(array.shape, len(expected)) != expected:
                raise ValueError(
                    f"Cannot resume: the array at {self.path_or_url!r} has shape "
                    f"{array.shape}, this computation needs leading dimensions {expected}."
                )

    def _axes(self, k: int) -> Tuple[int, ...]:
        return tuple(range(k)) if self.axes is None else self.axes

    def _chunked(self, shape: Sequence[int], k: int) -> Tuple[int, ...]:
        """The sizes of `shape` along the chunked axes."""
        return tuple(int(shape[a]) for a in self._axes(k))

    def _whole(self, shape: Sequence[int], k: int) -> Tuple[int, ...]:
        """The sizes of `shape` along the other axes (stored whole in every chunk)."""
        axes = self._axes(k)
        return tuple(int(n) for a, n in enumerate(shape) if a not in axes)

    def _with(self, chunked: Sequence[int], whole: Sequence[int]) -> Tuple[int, ...]:
        """A shape from its sizes along the chunked and the other axes."""
        axes = self._axes(len(chunked))
        sizes, rest = dict(zip(axes, chunked)), iter(whole)
        return tuple(
            int(sizes[a]) if a in sizes else int(next(rest))
            for a in range(len(chunked) + len(whole))
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
            chunk_leading = self._chunked(block.shape, k)
        whole = self._whole(block.shape, k)
        shape = self._with(leading, whole)
        chunks = tuple(max(c, 1) for c in self._with(chunk_leading, whole))
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
        whole = self._whole(array.shape, k)
        if block.dtype != array.dtype or self._whole(block.shape, k) != whole:
            token = self.metadata.get("token_axis")
            hint = (
                ""
                if token is None
                else f" (axis {token} holds the tokens: pass max_length to pad every chunk "
                "to one length)"
            )
            raise ValueError(
                f"Chunk {index} has dtype {block.dtype} and whole axes "
                f"{self._whole(block.shape, k)}, the array at {self.path_or_url!r} has dtype "
                f"{array.dtype} and whole axes {whole}{hint}."
            )
        current = self._chunked(array.shape, k)
        needed = tuple(max(e[1], s) for e, s in zip(extent, current))
        if needed != current:
            if self.planned_lengths is not None:
                raise ValueError(
                    f"Chunk {index} reaches {needed}, beyond the planned shape {array.shape}."
                )
            array.resize(self._with(needed, whole))
        array[self.region(extent, array.ndim)] = block
        write_marker(array, index, extent)
        self.done[index] = extent

    def region(self, extent: Extent, ndim: int) -> Tuple[slice, ...]:
        """The slices of the array a chunk of `extent` covers (whole along the other axes)."""
        axes = self._axes(len(extent))
        bounds = dict(zip(axes, extent))
        return tuple(
            slice(bounds[a][0], bounds[a][1]) if a in bounds else slice(None) for a in range(ndim)
        )

    def finish(self, leading_shape: Tuple[int, ...]) -> "zarr.Array":
        """Mark the array complete; `leading_shape` is its size along the chunked axes."""
        array = self.array
        if array is None:
            raise ValueError("Nothing was written: the sequence produced no chunk.")
        k = len(leading_shape)
        if self._chunked(array.shape, k) != tuple(leading_shape):
            if self.planned_lengths is not None:
                raise ValueError(
                    f"The data covered {leading_shape}, the planned array has shape "
                    f"{array.shape} (did the data change while writing?)."
                )
            array.resize(self._with(leading_shape, self._whole(array.shape, k)))
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


def sample_axes(ndim: int, token_axis: Optional[int] = None) -> Tuple[int, ...]:
    """The chunked axes of an array of `ndim` axes: the first two (one for a 1-D array), or,
    with a `token_axis` (per-token influences), the first three without it."""
    if token_axis is None:
        return tuple(range(max(1, min(2, ndim))))
    return tuple(a for a in range(min(3, ndim)) if a != token_axis)


def _write_dask_block(
    block: NDArray,
    array: "zarr.Array",
    index: ChunkIndex,
    extent: Extent,
    region: Tuple[slice, ...],
) -> int:
    array[region] = block
    write_marker(array, index, extent)
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
        array: the dask array; chunked along at most its first two axes (the first three
            but the token axis, for per-token influences whose metadata names a
            `token_axis`), with regular chunks
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

    check_store_args(overwrite, resume)
    if metadata is None:
        metadata = dict(getattr(array, "zarr_metadata", None) or {})
    axes = sample_axes(array.ndim, metadata.get("token_axis"))
    for axis, chunks in enumerate(array.chunks):
        if axis not in axes and len(chunks) > 1:
            allowed = (
                f"first {len(axes)} axes" if axes == tuple(range(len(axes))) else f"axes {axes}"
            )
            raise ValueError(
                f"Parameter 'array' may be chunked along its {allowed} only, got "
                f"{len(chunks)} chunks along axis {axis}; rechunk it first."
            )
        irregular = len(set(chunks[:-1])) > 1 or (len(chunks) > 1 and chunks[-1] > chunks[0])
        if axis in axes and irregular:
            raise ValueError(
                f"Parameter 'array' must have regular chunks along axis {axis} (all equal "
                f"but a smaller last one), got {chunks}; rechunk it first."
            )
    planned = [list(map(int, array.chunks[a])) for a in axes]
    writer = ZarrChunkWriter(
        path_or_url,
        planned_lengths=planned,
        metadata=metadata,
        overwrite=overwrite,
        resume=resume,
        axes=axes,
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
    extents = [chunk_extents(p) for p in planned]
    blocks = array.to_delayed()
    tasks = []
    for index in np.ndindex(*[len(p) for p in planned]):
        index = tuple(int(i) for i in index)
        extent = tuple(extents[a][index[a]] for a in range(len(axes)))
        if writer.is_done(index, extent):
            continue
        position = dict(zip(axes, index))
        block = blocks[tuple(position.get(a, 0) for a in range(array.ndim))]
        region = writer.region(extent, array.ndim)
        tasks.append(dask.delayed(_write_dask_block)(block, target, index, extent, region))
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
    written = read_markers(target)
    missing = [
        idx for idx in np.ndindex(*[len(p) for p in planned]) if tuple(map(int, idx)) not in written
    ]
    if missing:  # pragma: no cover - the scheduler raises for failed tasks
        raise RuntimeError(f"{len(missing)} blocks were not written, e.g. {missing[:3]}.")
    writer.done = written
    array_out = writer.finish(tuple(array.shape[a] for a in axes))
    return array_out if return_stored else None
