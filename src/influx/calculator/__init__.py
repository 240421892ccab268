r"""Influence for large amounts of data: map a fitted influence model over chunks.

Both calculators take a fitted
[InfluenceFunctionModel][influx.base_influence_function_model.InfluenceFunctionModel] and apply it chunk by chunk:

* [SequentialInfluenceCalculator][influx.calculator.SequentialInfluenceCalculator] over data
  iterables (e.g. `DataLoader`s), one chunk after the other, returning lazy sequences that
  are aggregated in memory or written to zarr;
* [DaskInfluenceCalculator][influx.calculator.DaskInfluenceCalculator] over
  `dask.array.Array`s chunked along the first axis, in parallel on a Dask cluster whose
  workers may run several threads and may join or leave during a computation.

**Cost.** For $T$ test chunks and $R$ train chunks, `influences` computes the influence
factors $(H + \lambda I)^{-1}\nabla_\theta \ell(z')$ of each test chunk **once** (that is,
$T$ inverse-Hessian solves) and pairs them with the gradients of every train chunk
($T \cdot R$ cheap products). Calling the model's own `influences` for every pair of chunks
would solve $T \cdot R$ times. If the factors are needed for several train sets, compute them
once with `influence_factors` and use `influences_from_factors`.

The package's modules: `influx.calculator.sequential`,
`influx.calculator.dask_calculator` (with
`influx.calculator.model_handles` and
`influx.calculator.worker_plugin`, how tasks reach the model) and
`influx.calculator.checks` (the input checks and their exceptions). dask and
distributed are imported only when the Dask calculator is used.
"""

from ..array import LazyChunk as LazyChunk
from ..array import LazyChunkRow as LazyChunkRow
from ..array import LazyChunkSequence as LazyChunkSequence
from ..array import NestedLazyChunkSequence as NestedLazyChunkSequence
from ..array import NumpyConverter as NumpyConverter
from ..base_influence_function_model import InfluenceFunctionModel as InfluenceFunctionModel
from ..types import InfluenceMode as InfluenceMode
from .checks import (
    DisableClientSingleThreadCheck,
    InvalidDimensionChunksError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
)
from .dask_calculator import DaskInfluenceCalculator
from .sequential import SequentialInfluenceCalculator

__all__ = [
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "InvalidDimensionChunksError",
    "SequentialInfluenceCalculator",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
]
