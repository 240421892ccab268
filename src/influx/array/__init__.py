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

The package has four modules, each importable on its own:
`influx.array.chunks` (lazy chunks, converters),
`influx.array.lazy` (the lazy sequences and their aggregators), `influx.array.zarr_writer`
(chunk-by-chunk zarr output, also from dask arrays) and `influx.array.status` (the
on-disk record of a write). zarr and dask are imported only when needed: importing this
package is cheap.
"""

from .chunks import LazyChunk, LazyChunkRow, NumpyConverter, TensorType
from .lazy import (
    LazyChunkSequence,
    ListAggregator,
    NestedLazyChunkSequence,
    NestedListAggregator,
    NestedSequenceAggregator,
    SequenceAggregator,
)
from .status import (
    ATTRIBUTE_KEY,
    FORMAT_VERSION,
    MARKER_PREFIX,
    ChunkIndex,
    Extent,
    ZarrWriteStatus,
    zarr_write_status,
)
from .zarr_writer import dask_array_to_zarr

__all__ = [
    "ATTRIBUTE_KEY",
    "ChunkIndex",
    "Extent",
    "FORMAT_VERSION",
    "LazyChunk",
    "LazyChunkRow",
    "LazyChunkSequence",
    "ListAggregator",
    "MARKER_PREFIX",
    "NestedLazyChunkSequence",
    "NestedListAggregator",
    "NestedSequenceAggregator",
    "NumpyConverter",
    "SequenceAggregator",
    "TensorType",
    "ZarrWriteStatus",
    "dask_array_to_zarr",
    "zarr_write_status",
]
