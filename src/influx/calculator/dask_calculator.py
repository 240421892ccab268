r"""The Dask calculator: a fitted influence model mapped over dask arrays, in parallel.

The model reaches the workers once, through a worker plugin
([ModelInstaller][influx.calculator.worker_plugin.ModelInstaller]) that the scheduler hands
to every worker, including workers that join or restart during a computation; tasks hold a
small handle ([InstalledModel][influx.calculator.model_handles.InstalledModel]) and look the
model up on their worker. No task depends on another worker's copy of the model, so a busy,
dying or late worker never blocks the computation, and every failure (an error in a task, a
model that cannot be deserialised on a worker) makes `compute()` raise.

dask and distributed are imported only when the calculator is used.
"""

from __future__ import annotations

import logging
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Type, Union

import numpy as np

from ..array import NumpyConverter
from ..base_influence_function_model import InfluenceFunctionModel
from ..types import InfluenceMode, check_mode
from .checks import (
    DisableClientSingleThreadCheck,
    InvalidDimensionChunksError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
    check_model,
    check_per_token,
    chunk_shape,
    numpy_dtype,
    self_influence_function,
    token_length,
)
from .dask_tasks import factors_task, influences_task, self_influences_task, serialize_model
from .model_handles import EmbeddedModel, InstalledModel
from .structured import first_leaf, is_structured, leaves_with_paths, map_leaves

if TYPE_CHECKING:  # pragma: no cover
    import dask.array
    from distributed import Client

__all__ = ["DaskInfluenceCalculator"]

logger = logging.getLogger(__name__)


class DaskInfluenceCalculator:
    r"""Computes influences over `dask.array.Array`s chunked along the first axis, in parallel.

    The fitted model is serialised once and installed on every worker of the client's
    cluster by a worker plugin, which the scheduler also hands to workers that join later or
    restart; tasks look the model up on their own worker. Workers may therefore come and go
    during a computation, and a task that fails (or a model that cannot be deserialised on a
    worker) makes `compute()` raise that error. Results are dask arrays with the inputs'
    chunks along the sample axes; nothing is computed until they are (`.compute()`,
    `.to_zarr(...)`, or [dask_array_to_zarr][influx.array.dask_array_to_zarr] for a resumable
    write).

    Workers may run several threads when the model is thread-safe (every influx torch model
    is). Call [close][influx.calculator.DaskInfluenceCalculator.close] (or use the calculator
    as a context manager) to remove the model from the workers when done.

    Args:
        influence_function_model: a fitted
            [InfluenceFunctionModel][influx.base_influence_function_model.InfluenceFunctionModel].
        converter: converts numpy chunks to the model's tensors and back, e.g.
            [TorchNumpyConverter][influx.torch.data.array_converters.TorchNumpyConverter].
        client: a `distributed.Client`, or the class
            [DisableClientSingleThreadCheck][influx.calculator.DisableClientSingleThreadCheck]
            to skip the thread-safety check and embed the model in each task graph instead
            (e.g. for the synchronous scheduler).

    Raises:
        ThreadSafetyViolationError: if the model is not thread-safe and a worker of the
            client has more than one thread (tasks raise it, too, on such a worker that joins
            later).
        TypeError: if the model cannot be serialised.

    Example:
        ```python
        client = Client(n_workers=2, threads_per_worker=2)
        with DaskInfluenceCalculator(model, TorchNumpyConverter(), client) as calc:
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
        # The width of the factors: `factor_size` for models whose factors live in another
        # space than the parameters (projected gradients), else the number of parameters.
        n_parameters = getattr(influence_function_model, "factor_size", None)
        if n_parameters is None:
            n_parameters = getattr(influence_function_model, "n_parameters", None)
        if n_parameters is None:
            raise TypeError(
                "Parameter 'influence_function_model' must have an 'n_parameters' attribute "
                f"(the size of its factors), {type(influence_function_model).__name__} has none."
            )
        self._n_parameters = int(n_parameters)
        self.influence_function_model = influence_function_model
        self.numpy_converter = converter
        self._dtype = numpy_dtype(influence_function_model, np.dtype(np.float32))
        self._plugin_name: Optional[str] = None
        token = f"influx-model-{uuid.uuid4().hex}"
        if client is DisableClientSingleThreadCheck:
            import dask

            logger.warning(DisableClientSingleThreadCheck.warning_msg())
            self._handle: Any = dask.delayed(
                EmbeddedModel(influence_function_model, token), pure=True
            )
            self.client = None
            return
        from distributed import Client

        if not isinstance(client, Client):
            raise TypeError(
                "Parameter 'client' must be a distributed.Client or the class "
                f"DisableClientSingleThreadCheck, got {type(client).__name__}."
            )
        self._check_threads(client, influence_function_model)
        from .worker_plugin import ModelInstaller

        payload = serialize_model(influence_function_model)
        client.register_plugin(ModelInstaller(token, payload), name=token)
        logger.debug("Installed the model as worker plugin %s (%d bytes).", token, len(payload))
        self._plugin_name = token
        self._handle = InstalledModel(token)
        self.client = client

    def close(self) -> None:
        """Remove the model from the workers (nothing to do without a client, or twice).

        Results not yet computed cannot be computed afterwards.
        """
        name, self._plugin_name = self._plugin_name, None
        if name is None or self.client is None or self.client.status != "running":
            return
        try:
            self.client.unregister_worker_plugin(name)
        except OSError as error:  # distributed's CommClosedError: a worker died meanwhile
            logger.warning(
                "The model's worker plugin %s could not be removed from every worker (a worker "
                "left the cluster: %s); workers that start later still receive it from the "
                "scheduler until the client closes.",
                name,
                error,
            )

    def __enter__(self) -> "DaskInfluenceCalculator":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

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

    @classmethod
    def _check_inputs(cls, value: Any, name: str) -> Tuple[int, ...]:
        """Check one array or a structure of arrays (e.g. a dict of dask arrays) and return
        the chunks of its first axis, which must be the same for all its arrays."""
        entries = leaves_with_paths(value, name)
        if not entries:
            raise ValueError(f"Parameter '{name}' must contain at least one dask array.")
        for path, array in entries:
            cls._check_array(array, path)
        first_path, first = entries[0]
        for path, array in entries[1:]:
            if array.chunks[0] != first.chunks[0]:
                raise UnalignedChunksError(first.chunks[0], array.chunks[0], (first_path, path))
        return tuple(first.chunks[0])

    def _check_pair(self, x: Any, y: Any, names: Tuple[str, str]) -> None:
        chunks_x = self._check_inputs(x, names[0])
        chunks_y = self._check_inputs(y, names[1])
        if chunks_x != chunks_y:
            raise UnalignedChunksError(chunks_x, chunks_y, names)

    @staticmethod
    def _sample_chunks(value: Any) -> Tuple[int, ...]:
        return tuple(first_leaf(value).chunks[0])  # type: ignore[union-attr]

    @staticmethod
    def _array_blocks(array: "dask.array.Array") -> List[Any]:
        delayed = array.to_delayed()
        return [delayed[(i,) + (0,) * (array.ndim - 1)] for i in range(len(array.chunks[0]))]

    @classmethod
    def _blocks(cls, value: Any) -> List[Any]:
        """The chunks along the first axis of an array, or of every array of a structure
        (one structure of blocks per chunk)."""
        if not is_structured(value):
            return cls._array_blocks(value)
        by_array = {id(a): cls._array_blocks(a) for _, a in leaves_with_paths(value, "x")}
        n_chunks = len(cls._sample_chunks(value))

        def chunk(index: int) -> Any:
            return map_leaves(lambda array: by_array[id(array)][index], value)

        return [chunk(i) for i in range(n_chunks)]

    def _perturbation_shape(self, x: Any) -> Tuple[int, ...]:
        """The shape of one sample of the input that Perturbation mode differentiates: of
        `x`, or as the model says for a structure of arrays."""
        if not is_structured(x):
            return tuple(x.shape[1:])
        shape_of = getattr(self.influence_function_model, "perturbation_shape", None)
        if shape_of is None:
            raise TypeError(
                f"{type(self.influence_function_model).__name__} cannot say which input of a "
                "structured 'x' Perturbation mode differentiates: it needs a "
                "'perturbation_shape(x)' method, as every influx influence model has."
            )
        empty = map_leaves(
            lambda a: self.numpy_converter.from_numpy(np.empty((0, *a.shape[1:]), dtype=a.dtype)),
            x,
        )
        return tuple(shape_of(empty))

    def _factor_blocks(
        self, x: "dask.array.Array", y: "dask.array.Array", options: Optional[Dict[str, Any]] = None
    ) -> List[Any]:
        import dask

        task = dask.delayed(factors_task, pure=True)
        return [
            task(xb, yb, self._handle, self.numpy_converter, self._dtype, options)
            for xb, yb in zip(self._blocks(x), self._blocks(y))
        ]

    def influence_factors(self, x: "dask.array.Array", y: "dask.array.Array") -> "dask.array.Array":
        r"""Influence factors $(H + \lambda I)^{-1}\nabla_\theta \ell(x_i, y_i)$, one task per chunk.

        Args:
            x: model inputs, chunked along the first axis only: one array, or a dict (tuple,
                list) of arrays with the same chunks along the first axis.
            y: targets, chunked like `x` along the first axis (an array or a structure).

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
            for b, n in zip(self._factor_blocks(x, y), self._sample_chunks(x))
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
        per_token: Optional[str] = None,
        max_length: Optional[int] = None,
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
            per_token: None, or `"test"` / `"train"` for per-token influences of a model
                whose task has per-token values (see
                [influx.torch.composition.per_token][]): `(N_test, T_test, N)` /
                `(N_test, N, T_train)`, chunked along the sample axes, the token axis whole.
                $T$ is axis 1 of the targets (the labels of a causal LM).
            max_length: with `per_token`, the length of the token axis; every chunk is padded
                with zeros to it.

        Returns:
            A dask array of shape `(N_test, N)` (`Up`) or `(N_test, N, *x.shape[1:])`
            (`Perturbation`), chunked as the test and train inputs, or with a token axis for
            `per_token`.

        Raises:
            ValueError: if exactly one of `x` and `y` is given.
            InvalidDimensionChunksError: if an input is chunked along another axis.
            UnalignedChunksError: if inputs and targets are chunked differently.
        """
        mode = check_mode(mode)
        token_axis = check_per_token(self.influence_function_model, per_token, mode, max_length)
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
        if per_token is None:
            factors = self._factor_blocks(x_test, y_test)
            return self._assemble(factors, self._sample_chunks(x_test), x, y, mode)
        options = {"per_token": per_token, "max_length": max_length}
        factors = self._factor_blocks(x_test, y_test, options)
        side = (x_test, y_test, "x_test") if per_token == "test" else (x, y, "x")
        length = token_length(side[0], side[1], max_length, side[2])
        return self._assemble(
            factors, self._sample_chunks(x_test), x, y, mode, options, (token_axis, length)
        )

    def _assemble(
        self,
        factor_blocks: List[Any],
        row_sizes: Tuple[int, ...],
        x: "dask.array.Array",
        y: "dask.array.Array",
        mode: InfluenceMode,
        options: Optional[Dict[str, Any]] = None,
        tokens: Optional[Tuple[Optional[int], int]] = None,
    ) -> "dask.array.Array":
        """The grid of chunks; `tokens` is the axis and length of the token axis of
        per-token influences (`options` their arguments)."""
        import dask
        import dask.array as da

        trailing = self._perturbation_shape(x) if mode is InfluenceMode.Perturbation else ()
        task = dask.delayed(influences_task, pure=True)
        x_blocks, y_blocks = self._blocks(x), self._blocks(y)
        metadata: Dict[str, Any] = {"quantity": "influences", "mode": mode.value}
        if tokens is not None:
            metadata.update(per_token=(options or {}).get("per_token"), token_axis=tokens[0])
        columns = 2 if tokens is not None and tokens[0] == 1 else 1

        def shape(n_rows: int, n_cols: int) -> Tuple[int, ...]:
            return chunk_shape(n_rows, n_cols, trailing, tokens)

        grid = [
            [
                da.from_delayed(
                    task(
                        f,
                        xb,
                        yb,
                        self._handle,
                        self.numpy_converter,
                        mode,
                        self._dtype,
                        options,
                        None if tokens is None else shape(n_rows, n_cols),
                    ),
                    shape=shape(n_rows, n_cols),
                    dtype=self._dtype,
                )
                for xb, yb, n_cols in zip(x_blocks, y_blocks, self._sample_chunks(x))
            ]
            for f, n_rows in zip(factor_blocks, row_sizes)
        ]
        result = da.concatenate([da.concatenate(row, axis=columns) for row in grid], axis=0)
        result.zarr_metadata = metadata  # type: ignore[attr-defined]
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
        self_influence_function(self.influence_function_model)
        self._check_pair(x, y, ("x", "y"))
        trailing = self._perturbation_shape(x) if mode is InfluenceMode.Perturbation else ()
        task = dask.delayed(self_influences_task, pure=True)
        blocks = [
            da.from_delayed(
                task(xb, yb, self._handle, self.numpy_converter, mode, self._dtype),
                shape=(n,) + trailing,
                dtype=self._dtype,
            )
            for xb, yb, n in zip(self._blocks(x), self._blocks(y), self._sample_chunks(x))
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
