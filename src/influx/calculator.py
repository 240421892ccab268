r"""Influence for large amounts of data: map a fitted influence model over chunks.

Both calculators take a fitted
[InfluenceFunctionModel][influx.types.InfluenceFunctionModel] and apply it chunk by chunk:

* [SequentialInfluenceCalculator][influx.calculator.SequentialInfluenceCalculator] over data
  iterables (e.g. `DataLoader`s), one chunk after the other, returning lazy sequences that
  are aggregated in memory or written to zarr;
* [DaskInfluenceCalculator][influx.calculator.DaskInfluenceCalculator] over
  `dask.array.Array`s chunked along the first axis, in parallel on a Dask cluster.

**Cost.** For $T$ test chunks and $R$ train chunks, `influences` computes the influence
factors $(H + \lambda I)^{-1}\nabla_\theta \ell(z')$ of each test chunk **once** (that is,
$T$ inverse-Hessian solves) and pairs them with the gradients of every train chunk
($T \cdot R$ cheap products). Calling the model's own `influences` for every pair of chunks
would solve $T \cdot R$ times. If the factors are needed for several train sets, compute them
once with `influence_factors` and use `influences_from_factors`.

dask and distributed are imported only when the Dask calculator is used.
"""

from __future__ import annotations

import functools
import logging
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import numpy as np

from .array import (
    LazyChunk,
    LazyChunkRow,
    LazyChunkSequence,
    NestedLazyChunkSequence,
    NumpyConverter,
)
from .types import InfluenceFunctionModel, InfluenceMode, check_mode

if TYPE_CHECKING:  # pragma: no cover
    import dask.array
    from distributed import Client

__all__ = [
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "InvalidDimensionChunksError",
    "SequentialInfluenceCalculator",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class InvalidDimensionChunksError(ValueError):
    """A dask array is chunked along an axis other than the first."""

    def __init__(self, chunks: Tuple[Tuple[int, ...], ...], name: str = "x"):
        super().__init__(
            f"Parameter '{name}' must be chunked along its first axis only, got chunks "
            f"{_chunks_summary(chunks)}; rechunk it, e.g. {name}.rechunk({{i: -1 for i in "
            f"range(1, {name}.ndim)}})."
        )


class UnalignedChunksError(ValueError):
    """Inputs and targets of a dask computation are chunked differently along the first axis."""

    def __init__(
        self,
        chunk_sizes_x: Tuple[int, ...],
        chunk_sizes_y: Tuple[int, ...],
        names: Tuple[str, str] = ("x", "y"),
    ):
        super().__init__(
            f"Parameters '{names[0]}' and '{names[1]}' must have the same chunks along the "
            f"first axis, got {_sizes_summary(chunk_sizes_x)} and "
            f"{_sizes_summary(chunk_sizes_y)}."
        )


class ThreadSafetyViolationError(ValueError):
    """A model that is not thread-safe would run on Dask workers with several threads."""

    def __init__(self, thread_counts: Optional[Dict[str, int]] = None):
        counts = "" if thread_counts is None else f" (threads per worker: {thread_counts})"
        super().__init__(
            "The influence model is not thread-safe, but the Dask client has workers with more "
            f"than one thread{counts}: start the cluster with threads_per_worker=1, or pass "
            "DisableClientSingleThreadCheck instead of the client to skip this check."
        )


class DisableClientSingleThreadCheck:
    """Pass this class instead of a `distributed.Client` to the
    [DaskInfluenceCalculator][influx.calculator.DaskInfluenceCalculator] to skip the check
    that a non-thread-safe model runs on single-threaded workers, e.g. to debug with the
    synchronous scheduler (`dask.config.set(scheduler="synchronous")`). The model is then
    embedded once in each graph instead of being scattered.
    """

    @staticmethod
    def warning_msg() -> str:
        return (
            "The thread-safety check of the Dask client is disabled: make sure that a model "
            "that is not thread-safe runs on single-threaded workers or the synchronous "
            "scheduler."
        )


def _sizes_summary(sizes: Tuple[int, ...]) -> str:
    sizes = tuple(sizes)
    if len(sizes) <= 6:
        return str(sizes)
    return f"({', '.join(map(str, sizes[:3]))}, ..., {sizes[-1]}) [{len(sizes)} chunks]"


def _chunks_summary(chunks: Tuple[Tuple[int, ...], ...]) -> str:
    return "(" + ", ".join(_sizes_summary(c) for c in chunks) + ")"


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


def _identity(value: T) -> T:
    return value


def _from_factors(
    model: InfluenceFunctionModel,
    factors: Callable[[], Any],
    x: Any,
    y: Any,
    mode: InfluenceMode,
) -> Any:
    return model.influences_from_factors(factors(), x, y, mode)


def check_model(model: Any) -> None:
    if not isinstance(model, InfluenceFunctionModel):
        raise TypeError(
            "Parameter 'influence_function_model' must be an InfluenceFunctionModel, got "
            f"{type(model).__name__}."
        )
    if not model.is_fitted:
        raise ValueError(
            f"Parameter 'influence_function_model': {type(model).__name__} is not fitted; "
            "call 'fit' with the training data first."
        )


def _batch(item: Any, name: str) -> Tuple[Any, Any]:
    try:
        x, y = item
    except (TypeError, ValueError):
        raise ValueError(
            f"Parameter '{name}' must yield (x, y) pairs, got an item of type "
            f"{type(item).__name__}."
        ) from None
    return x, y


class SequentialInfluenceCalculator:
    r"""Maps a fitted influence model over data chunks, one after the other.

    Nothing is computed when `influence_factors`, `influences` or
    `influences_from_factors` is called: they return lazy sequences; the work happens in
    `compute` (results in memory) or `to_zarr` (results on disk, one chunk in memory at a
    time, resumable).

    Args:
        influence_function_model: a fitted
            [InfluenceFunctionModel][influx.types.InfluenceFunctionModel].

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
        compute = _self_influence_function(model)

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

        Returns:
            A lazy nested sequence: rows of chunks of shape `(test_batch, train_batch)`
            (`Up`) or `(test_batch, train_batch, *x.shape[1:])` (`Perturbation`).
        """
        mode = check_mode(mode)
        _check_reiterable(test_data_iterable, "test_data_iterable")
        _check_reiterable(train_data_iterable, "train_data_iterable")
        model = self.influence_function_model

        def rows() -> Iterator[LazyChunkRow]:
            for item in test_data_iterable:
                x_test, y_test = _batch(item, "test_data_iterable")
                factors = _Once(functools.partial(model.influence_factors, x_test, y_test))
                yield LazyChunkRow(
                    self._row_chunks(factors, train_data_iterable, mode), _length(x_test)
                )

        return NestedLazyChunkSequence(
            rows,  # type: ignore[arg-type]
            len_outer_generator=_len_or_none(test_data_iterable),
            metadata={"quantity": "influences", "mode": mode.value},
            chunk_lengths=functools.partial(_grid_lengths, test_data_iterable, train_data_iterable),
        )

    def _row_chunks(
        self,
        factors: Callable[[], Any],
        train_data_iterable: Iterable[Tuple[Any, Any]],
        mode: InfluenceMode,
    ) -> Callable[[], Iterator[LazyChunk]]:
        model = self.influence_function_model

        def chunks() -> Iterator[LazyChunk]:
            for item in train_data_iterable:
                x, y = _batch(item, "train_data_iterable")
                yield LazyChunk(
                    functools.partial(_from_factors, model, factors, x, y, mode), _length(x)
                )

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
                the list returned by `influence_factors(...).compute()`.
            train_data_iterable: a re-iterable of `(x, y)` batches.
            mode: `InfluenceMode.Up` or `InfluenceMode.Perturbation`.

        Returns:
            A lazy nested sequence, as for `influences`.
        """
        mode = check_mode(mode)
        _check_reiterable(z_test_factors, "z_test_factors")
        _check_reiterable(train_data_iterable, "train_data_iterable")

        def rows() -> Iterator[LazyChunkRow]:
            for factors in z_test_factors:
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


def _self_influence_function(model: Any) -> Callable[..., Any]:
    compute = getattr(model, "self_influences", None)
    if compute is None:
        raise TypeError(
            f"{type(model).__name__} does not compute self-influences: it needs a "
            "'self_influences(x, y, mode)' method, as every influx influence model has."
        )
    return compute  # type: ignore[no-any-return]


def _self_influences_task(
    x: np.ndarray,
    y: np.ndarray,
    model: InfluenceFunctionModel,
    converter: NumpyConverter,
    mode: InfluenceMode,
    dtype: np.dtype,
) -> np.ndarray:
    result = _self_influence_function(model)(converter.from_numpy(x), converter.from_numpy(y), mode)
    return np.asarray(converter.to_numpy(result), dtype=dtype)


def _numpy_dtype(model: Any, fallback: np.dtype) -> np.dtype:
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        return fallback
    try:
        return np.dtype(str(dtype).split(".")[-1])
    except TypeError:
        return fallback


def _factors_task(
    x: np.ndarray,
    y: np.ndarray,
    model: InfluenceFunctionModel,
    converter: NumpyConverter,
    dtype: np.dtype,
) -> np.ndarray:
    result = model.influence_factors(converter.from_numpy(x), converter.from_numpy(y))
    return np.asarray(converter.to_numpy(result), dtype=dtype)


def _influences_task(
    factors: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    model: InfluenceFunctionModel,
    converter: NumpyConverter,
    mode: InfluenceMode,
    dtype: np.dtype,
) -> np.ndarray:
    result = model.influences_from_factors(
        converter.from_numpy(factors), converter.from_numpy(x), converter.from_numpy(y), mode
    )
    return np.asarray(converter.to_numpy(result), dtype=dtype)


class DaskInfluenceCalculator:
    r"""Computes influences over `dask.array.Array`s chunked along the first axis, in parallel.

    The fitted model is sent to every worker once (`client.scatter(..., broadcast=True)`)
    and referenced by all tasks. Results are dask arrays with the inputs' chunks along the
    sample axes; nothing is computed until they are (`.compute()`, `.to_zarr(...)`, or
    [dask_array_to_zarr][influx.array.dask_array_to_zarr] for a resumable write).

    Args:
        influence_function_model: a fitted
            [InfluenceFunctionModel][influx.types.InfluenceFunctionModel].
        converter: converts numpy chunks to the model's tensors and back, e.g.
            [TorchNumpyConverter][influx.torch.util.TorchNumpyConverter].
        client: a `distributed.Client`, or the class
            [DisableClientSingleThreadCheck][influx.calculator.DisableClientSingleThreadCheck]
            to skip the thread-safety check (and scatter nothing).

    Raises:
        ThreadSafetyViolationError: if the model is not thread-safe (e.g. every torch model)
            and a worker of the client has more than one thread.

    Example:
        ```python
        client = Client(n_workers=2, threads_per_worker=1)
        calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
        x, y = torch_dataset_to_dask_array(train_set, chunk_size=500)
        x_test, y_test = torch_dataset_to_dask_array(test_set, chunk_size=100)
        values = calc.influences(x_test, y_test, x, y)  # dask array
        dask_array_to_zarr(values, "influences.zarr")
        ```
    """

    def __init__(
        self,
        influence_function_model: InfluenceFunctionModel,
        converter: NumpyConverter,
        client: Union["Client", Type[DisableClientSingleThreadCheck]],
    ):
        check_model(influence_function_model)
        if not isinstance(converter, NumpyConverter):
            raise TypeError(
                f"Parameter 'converter' must be a NumpyConverter, got {type(converter).__name__}."
            )
        n_parameters = getattr(influence_function_model, "n_parameters", None)
        if n_parameters is None:
            raise TypeError(
                "Parameter 'influence_function_model' must have an 'n_parameters' attribute "
                f"(the size of its factors), {type(influence_function_model).__name__} has none."
            )
        self._n_parameters = int(n_parameters)
        self.influence_function_model = influence_function_model
        self.numpy_converter = converter
        self._dtype = _numpy_dtype(influence_function_model, np.dtype(np.float32))
        import dask

        if client is DisableClientSingleThreadCheck:
            logger.warning(DisableClientSingleThreadCheck.warning_msg())
            self._model_ref: Any = dask.delayed(influence_function_model, pure=True)
            self.client = None
        else:
            from distributed import Client

            if not isinstance(client, Client):
                raise TypeError(
                    "Parameter 'client' must be a distributed.Client or the class "
                    f"DisableClientSingleThreadCheck, got {type(client).__name__}."
                )
            self._check_threads(client, influence_function_model)
            self._model_ref = client.scatter(influence_function_model, broadcast=True, hash=False)
            self.client = client

    @staticmethod
    def _check_threads(client: "Client", model: InfluenceFunctionModel) -> None:
        if model.is_thread_safe:
            return
        workers = client.scheduler_info(n_workers=-1)["workers"]
        threads = {str(address): int(info["nthreads"]) for address, info in workers.items()}
        if any(n > 1 for n in threads.values()):
            raise ThreadSafetyViolationError(threads)

    @property
    def n_parameters(self) -> int:
        """The number of trainable parameters of the model (the width of the factors)."""
        return self._n_parameters

    @staticmethod
    def _check_array(array: Any, name: str) -> None:
        import dask.array as da

        if not isinstance(array, da.Array):
            raise TypeError(
                f"Parameter '{name}' must be a dask.array.Array, got {type(array).__name__}."
            )
        if array.ndim == 0:
            raise ValueError(f"Parameter '{name}' must have a sample axis, got a scalar array.")
        if any(len(c) > 1 for c in array.chunks[1:]):
            raise InvalidDimensionChunksError(array.chunks, name)

    def _check_pair(self, x: Any, y: Any, names: Tuple[str, str]) -> None:
        self._check_array(x, names[0])
        self._check_array(y, names[1])
        if x.chunks[0] != y.chunks[0]:
            raise UnalignedChunksError(x.chunks[0], y.chunks[0], names)

    @staticmethod
    def _blocks(array: "dask.array.Array") -> List[Any]:
        delayed = array.to_delayed()
        return [delayed[(i,) + (0,) * (array.ndim - 1)] for i in range(len(array.chunks[0]))]

    def _factor_blocks(self, x: "dask.array.Array", y: "dask.array.Array") -> List[Any]:
        import dask

        task = dask.delayed(_factors_task, pure=True)
        return [
            task(xb, yb, self._model_ref, self.numpy_converter, self._dtype)
            for xb, yb in zip(self._blocks(x), self._blocks(y))
        ]

    def influence_factors(self, x: "dask.array.Array", y: "dask.array.Array") -> "dask.array.Array":
        r"""Influence factors $(H + \lambda I)^{-1}\nabla_\theta \ell(x_i, y_i)$, one task per chunk.

        Args:
            x: model inputs, chunked along the first axis only.
            y: targets, chunked like `x` along the first axis.

        Returns:
            A dask array of shape `(N, n_parameters)` with the chunks of `x`.

        Raises:
            InvalidDimensionChunksError: if `x` or `y` is chunked along another axis.
            UnalignedChunksError: if `x` and `y` have different chunks.
        """
        import dask.array as da

        self._check_pair(x, y, ("x", "y"))
        blocks = [
            da.from_delayed(b, shape=(n, self.n_parameters), dtype=self._dtype)
            for b, n in zip(self._factor_blocks(x, y), x.chunks[0])
        ]
        result = da.concatenate(blocks, axis=0)
        result.zarr_metadata = {"quantity": "influence_factors"}  # type: ignore[attr-defined]
        return result

    def influences(
        self,
        x_test: "dask.array.Array",
        y_test: "dask.array.Array",
        x: Optional["dask.array.Array"] = None,
        y: Optional["dask.array.Array"] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "dask.array.Array":
        r"""Influences of `(x, y)` on `(x_test, y_test)`, one task per pair of chunks.

        Entry $(i, j)$ is
        $\langle (H + \lambda I)^{-1}\nabla_\theta \ell(z'_i), \nabla_\theta \ell(z_j)\rangle$
        (`Up`), or with $\nabla_x\nabla_\theta \ell(z_j)$ on the right (`Perturbation`).

        The graph computes the factors of each test chunk in one task and every block
        $(i, j)$ from them: $T$ inverse solves for $T$ test chunks, not $T \cdot R$.

        Args:
            x_test: test inputs, chunked along the first axis only.
            y_test: test targets, chunked like `x_test`.
            x: train inputs; if None (together with `y`), the test data is used.
            y: train targets, chunked like `x`.
            mode: `InfluenceMode.Up` or `InfluenceMode.Perturbation`.

        Returns:
            A dask array of shape `(N_test, N)` (`Up`) or `(N_test, N, *x.shape[1:])`
            (`Perturbation`), chunked as the test and train inputs.

        Raises:
            ValueError: if exactly one of `x` and `y` is given.
            InvalidDimensionChunksError: if an input is chunked along another axis.
            UnalignedChunksError: if inputs and targets are chunked differently.
        """
        mode = check_mode(mode)
        if (x is None) != (y is None):
            missing, given = ("y", "x") if y is None else ("x", "y")
            raise ValueError(
                f"Parameter '{missing}' is required when '{given}' is given: pass both training "
                "inputs and targets, or neither to compute test-by-test influences."
            )
        self._check_pair(x_test, y_test, ("x_test", "y_test"))
        if x is None or y is None:
            x, y = x_test, y_test
        else:
            self._check_pair(x, y, ("x", "y"))
        factors = self._factor_blocks(x_test, y_test)
        return self._assemble(factors, x_test.chunks[0], x, y, mode)

    def _assemble(
        self,
        factor_blocks: List[Any],
        row_sizes: Tuple[int, ...],
        x: "dask.array.Array",
        y: "dask.array.Array",
        mode: InfluenceMode,
    ) -> "dask.array.Array":
        import dask
        import dask.array as da

        trailing = tuple(x.shape[1:]) if mode is InfluenceMode.Perturbation else ()
        task = dask.delayed(_influences_task, pure=True)
        x_blocks, y_blocks = self._blocks(x), self._blocks(y)
        grid = [
            [
                da.from_delayed(
                    task(f, xb, yb, self._model_ref, self.numpy_converter, mode, self._dtype),
                    shape=(n_rows, n_cols) + trailing,
                    dtype=self._dtype,
                )
                for xb, yb, n_cols in zip(x_blocks, y_blocks, x.chunks[0])
            ]
            for f, n_rows in zip(factor_blocks, row_sizes)
        ]
        result = da.concatenate([da.concatenate(row, axis=1) for row in grid], axis=0)
        result.zarr_metadata = {"quantity": "influences", "mode": mode.value}  # type: ignore[attr-defined]
        return result

    def self_influences(
        self,
        x: "dask.array.Array",
        y: "dask.array.Array",
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "dask.array.Array":
        r"""Self-influences $I(z_i, z_i)$, one task per chunk: the diagonal of the influence
        matrix with one factor and one gradient per point.

        Args:
            x: inputs, chunked along the first axis only.
            y: targets, chunked like `x`.
            mode: `InfluenceMode.Up` or `InfluenceMode.Perturbation`.

        Returns:
            A dask array of shape `(N,)` (`Up`) or `(N, *x.shape[1:])` (`Perturbation`),
            with the chunks of `x`.

        Raises:
            InvalidDimensionChunksError: if `x` or `y` is chunked along another axis.
            UnalignedChunksError: if `x` and `y` have different chunks.
        """
        import dask
        import dask.array as da

        mode = check_mode(mode)
        _self_influence_function(self.influence_function_model)
        self._check_pair(x, y, ("x", "y"))
        trailing = tuple(x.shape[1:]) if mode is InfluenceMode.Perturbation else ()
        task = dask.delayed(_self_influences_task, pure=True)
        blocks = [
            da.from_delayed(
                task(xb, yb, self._model_ref, self.numpy_converter, mode, self._dtype),
                shape=(n,) + trailing,
                dtype=self._dtype,
            )
            for xb, yb, n in zip(self._blocks(x), self._blocks(y), x.chunks[0])
        ]
        result = da.concatenate(blocks, axis=0)
        result.zarr_metadata = {"quantity": "self_influences", "mode": mode.value}  # type: ignore[attr-defined]
        return result

    def influences_from_factors(
        self,
        z_test_factors: "dask.array.Array",
        x: "dask.array.Array",
        y: "dask.array.Array",
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "dask.array.Array":
        r"""Influences from pre-computed test factors, one task per pair of chunks.

        Entry $(i, j)$ is $\langle u_i, \nabla_\theta \ell(z_j)\rangle$ for the factors
        $u_i$ (`Up`), or with $\nabla_x\nabla_\theta \ell(z_j)$ on the right
        (`Perturbation`). No inverse solve happens: the cheapest path when factors are
        reused for several train sets.

        Args:
            z_test_factors: factors of shape `(N_test, n_parameters)`, chunked along the first
                axis only (e.g. from `influence_factors`).
            x: train inputs, chunked along the first axis only.
            y: train targets, chunked like `x`.
            mode: `InfluenceMode.Up` or `InfluenceMode.Perturbation`.

        Returns:
            A dask array as for `influences`.

        Raises:
            ValueError: if the factors do not have `n_parameters` columns.
            InvalidDimensionChunksError: if an input is chunked along another axis.
            UnalignedChunksError: if `x` and `y` are chunked differently.
        """
        mode = check_mode(mode)
        self._check_array(z_test_factors, "z_test_factors")
        if z_test_factors.ndim != 2 or z_test_factors.shape[1] != self.n_parameters:
            raise ValueError(
                f"Parameter 'z_test_factors' must have shape (N, {self.n_parameters}), got "
                f"{z_test_factors.shape}."
            )
        self._check_pair(x, y, ("x", "y"))
        return self._assemble(self._blocks(z_test_factors), z_test_factors.chunks[0], x, y, mode)
