"""The on-disk record of an influx zarr write: attributes, completion markers, status.

Every chunk written by [LazyChunkSequence.to_zarr][influx.array.LazyChunkSequence.to_zarr] or
[dask_array_to_zarr][influx.array.dask_array_to_zarr] is followed by a small completion marker
(a key `influx_done/<i>.<j>` inside the array's own prefix of the store, holding the chunk's
extent); the array's attributes (key `"influx"`) record what it holds and whether the write is
complete. [zarr_write_status][influx.array.zarr_write_status] reads both.

zarr is imported only inside the functions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import zarr

__all__ = [
    "ATTRIBUTE_KEY",
    "ChunkIndex",
    "Extent",
    "FORMAT_VERSION",
    "MARKER_PREFIX",
    "ZarrWriteStatus",
    "library_version",
    "read_markers",
    "write_marker",
    "zarr_write_status",
]

logger = logging.getLogger(__name__)

ATTRIBUTE_KEY = "influx"
"""The key of the array attribute where influx records what the array holds."""
MARKER_PREFIX = "influx_done"
"""The prefix (inside the array's prefix in the store) of the completion markers."""
FORMAT_VERSION = 1

Extent = Tuple[Tuple[int, int], ...]
ChunkIndex = Tuple[int, ...]


def library_version() -> str:
    """The version of influx, recorded with every array it writes."""
    from .. import __version__

    return __version__


def _marker_key(array: "zarr.Array", index: ChunkIndex) -> str:
    name = ".".join(str(i) for i in index)
    prefix = f"{array.path}/" if array.path else ""
    return f"{prefix}{MARKER_PREFIX}/{name}"


def write_marker(array: "zarr.Array", index: ChunkIndex, extent: Extent) -> None:
    """Record that chunk `index` with `extent` is completely written (after its data)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    payload = json.dumps({"extent": [list(e) for e in extent]}).encode()
    buffer = default_buffer_prototype().buffer.from_bytes(payload)
    sync(array.store.set(_marker_key(array, index), buffer))


def read_markers(array: "zarr.Array") -> Dict[ChunkIndex, Extent]:
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
    done = read_markers(array)
    planned = _planned_indices(metadata.get("chunk_lengths"))
    missing = [] if planned is None else [idx for idx in planned if idx not in done]
    return ZarrWriteStatus(
        complete=bool(metadata.get("complete", False)),
        n_completed_chunks=len(done),
        n_chunks=None if planned is None else len(planned),
        missing_chunks=missing,
        metadata=metadata,
    )
