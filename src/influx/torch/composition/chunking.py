r"""Influence matrices within a memory budget: the training side in chunks.

`influences(x_test, y_test, x, y)` pairs the factors $(C + \lambda I)^{-1} \nabla_\theta
\ell(z'_i)$ of the test points with the per-sample gradients of the training points. Formed
at once, those gradients take $N \times P$ values (and $N \times F \times P$ mixed derivatives
in Perturbation mode, $F$ input features per sample), whatever the method. Above
[INFLUENCES_MEMORY_BUDGET][influx.torch.composition.chunking.INFLUENCES_MEMORY_BUDGET] bytes,
[influences_in_chunks][influx.torch.composition.chunking.influences_in_chunks] computes the
test factors once and the columns of the matrix chunk by chunk of training points, each
chunk's gradients within the budget; the values are those of the unchunked matrix (the same
products, column by column).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, List, Optional, Protocol, Tuple, cast

import torch

from ...types import InfluenceMode, check_mode
from ..data.batches import TorchBatch
from ..data.structures import rows

__all__ = [
    "INFLUENCES_MEMORY_BUDGET",
    "ChunkedInfluences",
    "FittedInfluence",
    "influences_in_chunks",
    "training_rows_per_chunk",
]

logger = logging.getLogger(__name__)

INFLUENCES_MEMORY_BUDGET = 2**28
"""Default bytes of per-sample gradients (or mixed derivatives) of the training side that
`influences` forms at once: 256 MB, e.g. 1,525 points of a 22 k-parameter model in float64.
Set a model's `influences_memory_budget` to change it."""


class FittedInfluence(Protocol):
    """What chunking needs of a fitted influence model (a
    [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence])."""

    influences_memory_budget: float

    @property
    def n_parameters(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def _create_batch(self, x: Any, y: Any) -> TorchBatch: ...

    def perturbation_shape(self, x: Any) -> Tuple[int, ...]: ...

    def influence_factors_by_block(self, x: Any, y: Any) -> Any: ...

    def influences_from_factors(
        self, z_test_factors: Any, x: Any, y: Any, mode: InfluenceMode = InfluenceMode.Up
    ) -> torch.Tensor: ...


def training_rows_per_chunk(values_per_row: int, itemsize: int, budget: float) -> int:
    """How many training points' gradients of `values_per_row` values of `itemsize` bytes
    fit in `budget` bytes (at least one; all of them for an infinite budget)."""
    if math.isinf(budget):
        return sys.maxsize
    return max(1, int(budget // max(1, values_per_row * itemsize)))


def influences_in_chunks(
    model: FittedInfluence,
    x_test: Any,
    y_test: Any,
    x: Any,
    y: Any,
    mode: InfluenceMode,
) -> Optional[torch.Tensor]:
    r"""The influence matrix `(N_test, N, ...)` from the test factors (computed once) and the
    training points in chunks whose per-sample gradients fit in the model's
    `influences_memory_budget`; None if all of them fit (the caller computes the matrix at
    once)."""
    batch = model._create_batch(x, y)
    values_per_row = model.n_parameters
    if mode is InfluenceMode.Perturbation:
        values_per_row *= math.prod(model.perturbation_shape(batch.x))
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    step = training_rows_per_chunk(values_per_row, itemsize, model.influences_memory_budget)
    n = len(batch)
    if n <= step:
        return None
    logger.debug("influences: %d training points in chunks of %d.", n, step)
    factors = model.influence_factors_by_block(x_test, y_test)
    parts: List[torch.Tensor] = [
        model.influences_from_factors(
            factors, rows(batch.x, start, start + step), rows(batch.y, start, start + step), mode
        )
        for start in range(0, n, step)
    ]
    return torch.cat(parts, dim=1)


class ChunkedInfluences:
    """The `influences` of [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]:
    the training side in chunks (see
    [influences_in_chunks][influx.torch.composition.chunking.influences_in_chunks])."""

    influences_memory_budget: float = INFLUENCES_MEMORY_BUDGET
    """Bytes of training-side per-sample gradients `influences` forms at once."""

    def influences(
        self,
        x_test: Any,
        y_test: Any,
        x: Optional[Any] = None,
        y: Optional[Any] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        """The influence matrix (see `ComposableInfluence.influences`), the training side in
        chunks whose per-sample gradients fit in `influences_memory_budget` bytes (the same
        values)."""
        mode = check_mode(mode)
        if x is not None and y is not None and getattr(self, "is_fitted", False):
            chunked = influences_in_chunks(cast(FittedInfluence, self), x_test, y_test, x, y, mode)
            if chunked is not None:
                return chunked
        return super().influences(x_test, y_test, x, y, mode)  # type: ignore[misc, no-any-return]
