r"""The sequential calculator: a fitted influence model mapped over data iterables, one chunk
after the other, into lazy chunk sequences."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

from ..array import LazyChunk, LazyChunkRow, LazyChunkSequence, NestedLazyChunkSequence
from ..base_influence_function_model import InfluenceFunctionModel
from ..types import InfluenceMode, check_mode
from .checks import check_model, check_ordered_iterable, check_per_token, self_influence_function
from .structured import first_leaf, is_structured, split_item

__all__ = ["SequentialInfluenceCalculator"]

T = TypeVar("T")


class _Once:
    """Computes a value on first use and keeps it."""

    __slots__ = ("_function", "_value", "_done")

    def __init__(self, function: Callable[[], Any]):
        self._function = function
        self._value: Any = None
        self._done = False

    def __call__(self) -> Any:
        if not self._done:
            self._value = self._function()
            self._done = True
            self._function = None  # type: ignore[assignment]
        return self._value


def _length(tensor: Any) -> Optional[int]:
    if is_structured(tensor):
        tensor = first_leaf(tensor)
    shape = getattr(tensor, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    try:
        return len(tensor)
    except TypeError:
        return None


def _len_or_none(iterable: Any) -> Optional[int]:
    try:
        return len(iterable)
    except TypeError:
        return None


def _batch_lengths(iterable: Any) -> Optional[List[int]]:
    """Batch sizes of a torch-style DataLoader from its batch sampler, without loading data."""
    batch_sampler = getattr(iterable, "batch_sampler", None)
    if batch_sampler is None or getattr(iterable, "dataset", None) is None:
        return None
    try:
        return [len(batch) for batch in batch_sampler]
    except TypeError:
        return None


def _grid_lengths(rows: Any, columns: Any) -> Optional[Tuple[List[int], List[int]]]:
    row_lengths, column_lengths = _batch_lengths(rows), _batch_lengths(columns)
    if row_lengths is None or column_lengths is None:
        return None
    return row_lengths, column_lengths


def _check_reiterable(iterable: Any, name: str) -> None:
    if not isinstance(iterable, Iterable):
        raise TypeError(
            f"Parameter '{name}' must be an iterable of (x, y) batches, got "
            f"{type(iterable).__name__}."
        )
    if iter(iterable) is iterable:
        raise TypeError(
            f"Parameter '{name}' must be iterable more than once (e.g. a DataLoader or a list "
            f"of batches), got a one-shot iterator of type {type(iterable).__name__}."
        )
    check_ordered_iterable(iterable, name)


def _identity(value: T) -> T:
    return value


class _TokenLength:
    """Checks that the chunks of per-token influences have one length along the token axis
    (the first chunk's, or `max_length` to which the model pads them)."""

    def __init__(self, axis: Optional[int], max_length: Optional[int]):
        self.axis = axis
        self.length = max_length

    def __call__(self, chunk: Any) -> Any:
        if self.axis is None:
            return chunk
        length = int(chunk.shape[self.axis])
        if self.length is None:
            self.length = length
        elif length != self.length:
            raise ValueError(
                f"Parameter 'max_length' is needed: a chunk of per-token influences has "
                f"{length} tokens along axis {self.axis}, an earlier one {self.length} (batches "
                "of sequences of different lengths); pass max_length to pad every chunk to it."
            )
        return chunk


def _from_factors(
    model: InfluenceFunctionModel,
    factors: Callable[[], Any],
    x: Any,
    y: Any,
    mode: InfluenceMode,
    options: Optional[Dict[str, Any]] = None,
    check: Callable[[Any], Any] = _identity,
) -> Any:
    return check(model.influences_from_factors(factors(), x, y, mode, **(options or {})))


def _factor_chunk(item: Any) -> Any:
    """A chunk of factors, unwrapped from the one-element list (or tuple) that a `DataLoader`
    over a single-tensor dataset yields."""
    if isinstance(item, (list, tuple)):
        if len(item) != 1:
            raise ValueError(
                "Parameter 'z_test_factors' must yield factor chunks (or one-element lists of "
                f"them, as a DataLoader over a TensorDataset of factors does), got a "
                f"{type(item).__name__} of {len(item)} elements."
            )
        return item[0]
    return item


def _batch(item: Any, name: str) -> Tuple[Any, Any]:
    return split_item(item, name)


class SequentialInfluenceCalculator:
    r"""Maps a fitted influence model over data chunks, one after the other.

    Nothing is computed when `influence_factors`, `influences` or
    `influences_from_factors` is called: they return lazy sequences; the work happens in
    `compute` (results in memory) or `to_zarr` (results on disk, one chunk in memory at a
    time, resumable).

    Args:
        influence_function_model: a fitted
            [InfluenceFunctionModel][influx.base_influence_function_model.InfluenceFunctionModel].

    Example:
        ```python
        calc = SequentialInfluenceCalculator(model)  # model fitted
        lazy = calc.influences(test_loader, train_loader)
        values = lazy.compute(aggregator=NestedTorchCatAggregator())  # in memory
        lazy.to_zarr("influences.zarr", TorchNumpyConverter())  # or on disk
        ```
    """

    def __init__(self, influence_function_model: InfluenceFunctionModel):
        check_model(influence_function_model)
        self.influence_function_model = influence_function_model

    def influence_factors(self, data_iterable: Iterable[Tuple[Any, Any]]) -> LazyChunkSequence:
        r"""Influence factors $(H + \lambda I)^{-1}\nabla_\theta \ell(x_i, y_i)$, chunk by chunk.

        Args:
            data_iterable: a re-iterable of `(x, y)` batches, e.g. a `DataLoader` without
                shuffling.

        Returns:
            A lazy sequence of chunks of shape `(batch_size, n_parameters)`.
        """
        _check_reiterable(data_iterable, "data_iterable")
        model = self.influence_function_model

        def chunks() -> Iterator[LazyChunk]:
            for item in data_iterable:
                x, y = _batch(item, "data_iterable")
                yield LazyChunk(functools.partial(model.influence_factors, x, y), _length(x))

        return LazyChunkSequence(
            chunks,  # type: ignore[arg-type]
            len_generator=_len_or_none(data_iterable),
            metadata={"quantity": "influence_factors"},
            chunk_lengths=functools.partial(_batch_lengths, data_iterable),
        )

    def self_influences(
        self,
        data_iterable: Iterable[Tuple[Any, Any]],
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> LazyChunkSequence:
        r"""Self-influences $I(z_i, z_i)$ of every point, chunk by chunk: the diagonal of the
        influence matrix with one factor and one gradient per point, never the matrix.

        Args:
            data_iterable: a re-iterable of `(x, y)` batches, e.g. a `DataLoader` without
                shuffling.
            mode: `InfluenceMode.Up` (chunks of shape `(batch_size,)`) or
                `InfluenceMode.Perturbation` (`(batch_size, *x.shape[1:])`).

        Returns:
            A lazy sequence; `compute` concatenates the chunks, `to_zarr` writes a 1-D (or,
            for `Perturbation`, feature-shaped) array.
        """
        mode = check_mode(mode)
        _check_reiterable(data_iterable, "data_iterable")
        model = self.influence_function_model
        compute = self_influence_function(model)

        def chunks() -> Iterator[LazyChunk]:
            for item in data_iterable:
                x, y = _batch(item, "data_iterable")
                yield LazyChunk(functools.partial(compute, x, y, mode), _length(x))

        return LazyChunkSequence(
            chunks,  # type: ignore[arg-type]
            len_generator=_len_or_none(data_iterable),
            metadata={"quantity": "self_influences", "mode": mode.value},
            chunk_lengths=functools.partial(_batch_lengths, data_iterable),
        )

    def influences(
        self,
        test_data_iterable: Iterable[Tuple[Any, Any]],
        train_data_iterable: Iterable[Tuple[Any, Any]],
        mode: InfluenceMode = InfluenceMode.Up,
        per_token: Optional[str] = None,
        max_length: Optional[int] = None,
    ) -> NestedLazyChunkSequence:
        r"""Influences of every train point on every test point, chunk by chunk.

        Chunk $(i, j)$ holds
        $\langle (H + \lambda I)^{-1}\nabla_\theta \ell(z'), \nabla_\theta \ell(z)\rangle$ for
        the test points $z'$ of test batch $i$ and the train points $z$ of train batch $j$
        (`Up`), or with $\nabla_x\nabla_\theta \ell(z)$ on the right (`Perturbation`, one
        value per input feature).

        The factors of each test batch are computed once and reused for all train batches:
        $T$ inverse solves for $T$ test batches instead of one per pair of batches. Each
        train batch's gradients are recomputed for every test batch; larger test batches
        therefore make the whole computation cheaper.

        Args:
            test_data_iterable: a re-iterable of `(x_test, y_test)` batches.
            train_data_iterable: a re-iterable of `(x, y)` batches (iterated once per test
                batch, so it must yield the same batches every time: no shuffling).
            mode: `InfluenceMode.Up` or `InfluenceMode.Perturbation`.
            per_token: None, or `"test"` / `"train"` for per-token influences of a model
                whose task has per-token values (see
                [influx.torch.composition.per_token][]): chunks of shape
                `(test_batch, T_test, train_batch)` / `(test_batch, train_batch, T_train)`,
                the token axis whole in every chunk (and in the zarr chunks).
            max_length: with `per_token`, pad the token axis of every chunk with zeros to this
                length: needed when the batches hold sequences of different lengths (a
                ValueError naming it otherwise); a longer batch is a ValueError.

        Returns:
            A lazy nested sequence: rows of chunks of shape `(test_batch, train_batch)`
            (`Up`) or `(test_batch, train_batch, *x.shape[1:])` (`Perturbation`), or with a
            token axis for `per_token`.
        """
        mode = check_mode(mode)
        model = self.influence_function_model
        token_axis = check_per_token(model, per_token, mode, max_length)
        _check_reiterable(test_data_iterable, "test_data_iterable")
        _check_reiterable(train_data_iterable, "train_data_iterable")
        options = {} if per_token is None else {"per_token": per_token, "max_length": max_length}
        metadata = {"quantity": "influences", "mode": mode.value}
        if per_token is not None:
            metadata["per_token"] = per_token

        def rows() -> Iterator[LazyChunkRow]:
            check = _TokenLength(token_axis, max_length)
            for item in test_data_iterable:
                x_test, y_test = _batch(item, "test_data_iterable")
                factors = _Once(
                    functools.partial(model.influence_factors, x_test, y_test, **options)
                )
                chunks = self._row_chunks(factors, train_data_iterable, mode, options, check)
                yield LazyChunkRow(chunks, _length(x_test))

        return NestedLazyChunkSequence(
            rows,  # type: ignore[arg-type]
            len_outer_generator=_len_or_none(test_data_iterable),
            metadata=metadata,
            chunk_lengths=functools.partial(_grid_lengths, test_data_iterable, train_data_iterable),
            token_axis=token_axis,
        )

    def _row_chunks(
        self,
        factors: Callable[[], Any],
        train_data_iterable: Iterable[Tuple[Any, Any]],
        mode: InfluenceMode,
        options: Optional[Dict[str, Any]] = None,
        check: Callable[[Any], Any] = _identity,
    ) -> Callable[[], Iterator[LazyChunk]]:
        model = self.influence_function_model

        def chunks() -> Iterator[LazyChunk]:
            for item in train_data_iterable:
                x, y = _batch(item, "train_data_iterable")
                compute = functools.partial(
                    _from_factors, model, factors, x, y, mode, options, check
                )
                yield LazyChunk(compute, _length(x))

        return chunks

    def influences_from_factors(
        self,
        z_test_factors: Iterable[Any],
        train_data_iterable: Iterable[Tuple[Any, Any]],
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> NestedLazyChunkSequence:
        r"""Influences from pre-computed test factors, chunk by chunk.

        Chunk $(i, j)$ holds $\langle u, \nabla_\theta \ell(z)\rangle$ for the factors $u$ of
        chunk $i$ of `z_test_factors` and the train points $z$ of train batch $j$ (`Up`), or
        with $\nabla_x\nabla_\theta \ell(z)$ on the right (`Perturbation`). No inverse solve
        happens here: this is the cheapest path when the factors are reused.

        Args:
            z_test_factors: a re-iterable of factor chunks of shape `(n, n_parameters)`, e.g.
                the list returned by `influence_factors(...).compute()`, or of one-element
                lists of them (the batches of a `DataLoader` over a `TensorDataset` of
                factors).
            train_data_iterable: a re-iterable of `(x, y)` batches.
            mode: `InfluenceMode.Up` or `InfluenceMode.Perturbation`.

        Returns:
            A lazy nested sequence, as for `influences`.
        """
        mode = check_mode(mode)
        _check_reiterable(z_test_factors, "z_test_factors")
        _check_reiterable(train_data_iterable, "train_data_iterable")

        def rows() -> Iterator[LazyChunkRow]:
            for item in z_test_factors:
                factors = _factor_chunk(item)
                yield LazyChunkRow(
                    self._row_chunks(
                        functools.partial(_identity, factors), train_data_iterable, mode
                    ),
                    _length(factors),
                )

        return NestedLazyChunkSequence(
            rows,  # type: ignore[arg-type]
            len_outer_generator=_len_or_none(z_test_factors),
            metadata={"quantity": "influences", "mode": mode.value},
        )
