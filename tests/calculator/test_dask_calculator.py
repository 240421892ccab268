"""The Dask calculator on the session's LocalCluster (2 worker processes, 2 threads each)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import Client
from torch.utils.data import TensorDataset

import influx.torch
import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx import (
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    InfluenceMode,
    InvalidDimensionChunksError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
)
from influx.array import dask_array_to_zarr, zarr_write_status
from influx.torch import DirectInfluence, TorchNumpyConverter, torch_dataset_to_dask_array

# The helper classes below travel to the worker processes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOSS = torch.nn.functional.cross_entropy
MODES = [InfluenceMode.Up, InfluenceMode.Perturbation]


class ThreadUnsafeDirectInfluence(DirectInfluence):
    """DirectInfluence that declares itself not thread-safe."""

    @property
    def is_thread_safe(self) -> bool:
        return False


class PickleCountingInfluence(DirectInfluence):
    """Counts how often it is pickled in this process."""

    pickled = 0

    def __getstate__(self) -> Dict[str, Any]:
        type(self).pickled += 1
        return dict(self.__dict__)


@pytest.fixture
def client(dask_client: Client) -> Client:
    return dask_client


def _data(
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = classification_data(37)
    x_test, y_test = classification_data(13, seed=3)
    return x.to(dtype), y, x_test.to(dtype), y_test


def _dask(x: torch.Tensor, y: torch.Tensor, chunk: int) -> Tuple[da.Array, da.Array]:
    return da.from_array(x.numpy(), chunks=(chunk, -1)), da.from_array(y.numpy(), chunks=chunk)


def _fit(cls: type = DirectInfluence, dtype: torch.dtype = torch.float64) -> Any:
    x, y, _, _ = _data(dtype)
    return cls(make_mlp().to(dtype), LOSS, regularization=0.01).fit(loader(x, y))


@pytest.fixture(scope="module")
def direct64() -> DirectInfluence:
    return _fit()


@pytest.mark.parametrize("mode", MODES)
def test_dask_influences_equal_in_memory_float64(
    client: Client, direct64: DirectInfluence, mode: InfluenceMode
) -> None:
    x, y, x_test, y_test = _data()
    reference = direct64.influences(x_test, y_test, x, y, mode=mode).numpy()
    calc = DaskInfluenceCalculator(direct64, TorchNumpyConverter(), client)
    assert calc.n_parameters == direct64.n_parameters
    dx, dy = _dask(x, y, 10)
    dx_test, dy_test = _dask(x_test, y_test, 5)
    values = calc.influences(dx_test, dy_test, dx, dy, mode=mode)
    assert values.shape == reference.shape and values.chunks[:2] == ((5, 5, 3), (10, 10, 10, 7))
    assert values.dtype == np.float64
    np.testing.assert_allclose(values.compute(), reference, rtol=1e-10, atol=1e-12)

    factors = calc.influence_factors(dx_test, dy_test)
    np.testing.assert_allclose(
        factors.compute(), direct64.influence_factors(x_test, y_test).numpy(), rtol=1e-10
    )
    from_factors = calc.influences_from_factors(factors, dx, dy, mode=mode)
    np.testing.assert_allclose(from_factors.compute(), reference, rtol=1e-10, atol=1e-12)


def test_dask_float32_test_on_test_and_zarr(client: Client, tmp_path: Path) -> None:
    model = _fit(dtype=torch.float32)
    x, y, x_test, y_test = _data(torch.float32)
    calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
    dx_test, dy_test = _dask(x_test, y_test, 4)
    values = calc.influences(dx_test, dy_test)  # test on test
    assert values.dtype == np.float32
    reference = model.influences(x_test, y_test)
    assert rel_err(torch.from_numpy(values.compute()), reference) < 1e-6

    dx, dy = _dask(x, y, 9)
    values = calc.influences(dx_test, dy_test, dx, dy, mode=InfluenceMode.Perturbation)
    reference = model.influences(x_test, y_test, x, y, mode=InfluenceMode.Perturbation)
    path = tmp_path / "p32.zarr"
    stored = dask_array_to_zarr(values, path, return_stored=True)
    assert stored is not None and stored.chunks == (4, 9, 5)
    assert rel_err(torch.from_numpy(zarr.open_array(path)[...]), reference) < 1e-6
    status = zarr_write_status(path)
    assert status.complete and status.n_completed_chunks == 4 * 5
    assert status.metadata["mode"] == "perturbation"

    # resuming a complete array computes nothing
    before = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.transition_log))
    dask_array_to_zarr(values, path, resume=True)
    after = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.transition_log))
    assert after == before


def test_dask_with_iterative_method(client: Client) -> None:
    x, y, x_test, y_test = _data()
    model = influx.torch.CgInfluence(
        make_mlp(), LOSS, regularization=0.1, rtol=1e-10, atol=1e-12
    ).fit(loader(x, y))
    calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
    for mode in MODES:
        reference = model.influences(x_test, y_test, x, y, mode=mode)
        values = calc.influences(*_dask(x_test, y_test, 5), *_dask(x, y, 10), mode=mode)
        assert rel_err(torch.from_numpy(values.compute()), reference) < 1e-6


def test_model_is_serialised_once(client: Client) -> None:
    """Once for the worker plugin, whatever the number of workers and tasks."""
    model = _fit(PickleCountingInfluence)
    PickleCountingInfluence.pickled = 0
    calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
    assert PickleCountingInfluence.pickled == 1
    x, y, x_test, y_test = _data()
    values = calc.influences(*_dask(x_test, y_test, 3), *_dask(x, y, 5))  # 5 x 8 tasks
    values.compute()
    assert PickleCountingInfluence.pickled == 1


def test_dask_errors(client: Client, direct64: DirectInfluence) -> None:
    x, y, x_test, y_test = _data()
    calc = DaskInfluenceCalculator(direct64, TorchNumpyConverter(), client)
    dx, dy = _dask(x, y, 10)
    with pytest.raises(InvalidDimensionChunksError, match="'x' must be chunked along its first"):
        calc.influence_factors(da.from_array(x.numpy(), chunks=(10, 2)), dy)
    with pytest.raises(UnalignedChunksError, match="'x' and 'y' must have the same chunks"):
        calc.influence_factors(dx, da.from_array(y.numpy(), chunks=7))
    with pytest.raises(UnalignedChunksError, match="'x_test' and 'y_test'"):
        calc.influences(dx, da.from_array(y.numpy(), chunks=7))
    with pytest.raises(ValueError, match="Parameter 'y' is required when 'x' is given"):
        calc.influences(dx, dy, dx)
    with pytest.raises(TypeError, match="'x' must be a dask.array.Array, got Tensor"):
        calc.influence_factors(x, dy)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="'z_test_factors' must have shape \\(N, 57\\), got \\(37, 5\\)"
    ):
        calc.influences_from_factors(dx, dx, dy)
    with pytest.raises(TypeError, match="'client' must be a distributed.Client"):
        DaskInfluenceCalculator(direct64, TorchNumpyConverter(), "localhost")  # type: ignore[arg-type]


def test_thread_safety_check(client: Client) -> None:
    model = _fit(ThreadUnsafeDirectInfluence)
    with pytest.raises(ThreadSafetyViolationError, match="not thread-safe.*threads_per_worker=1"):
        DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
    # a thread-safe model is accepted on the same 2-thread workers
    DaskInfluenceCalculator(_fit(), TorchNumpyConverter(), client).close()


def test_disable_client_check_with_synchronous_scheduler(direct64: DirectInfluence) -> None:
    x, y, x_test, y_test = _data()
    calc = DaskInfluenceCalculator(direct64, TorchNumpyConverter(), DisableClientSingleThreadCheck)
    with dask.config.set(scheduler="synchronous"):
        values = calc.influences(*_dask(x_test, y_test, 6), *_dask(x, y, 11)).compute()
    np.testing.assert_allclose(
        values, direct64.influences(x_test, y_test, x, y).numpy(), rtol=1e-10, atol=1e-12
    )


def test_torch_dataset_to_dask_array() -> None:
    x, y, _, _ = _data()
    dx, dy = torch_dataset_to_dask_array(TensorDataset(x, y), chunk_size=8)
    # the dataset's own dtype by default: float64 samples for a float64 model stay float64
    assert x.dtype == torch.float64
    assert dx.chunks == ((8, 8, 8, 8, 5), (5,)) and dx.dtype == np.float64
    assert dy.dtype == np.int64 and dy.chunks == ((8, 8, 8, 8, 5),)
    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_array_equal(dx.compute(), x.numpy())
        np.testing.assert_array_equal(dy.compute(), y.numpy())
    (d32,) = torch_dataset_to_dask_array(TensorDataset(x), 10, resulting_dtype=np.float32)
    assert d32.dtype == np.float32
    with pytest.raises(ValueError, match="'chunk_size' must be a positive integer, got 0"):
        torch_dataset_to_dask_array(TensorDataset(x, y), 0)
    with pytest.raises(
        ValueError, match="'total_size' \\(5\\) differs from len\\(dataset\\) \\(37\\)"
    ):
        torch_dataset_to_dask_array(TensorDataset(x, y), 4, total_size=5)


def test_dask_array_to_zarr_chunks_and_progress(client: Client, tmp_path: Path) -> None:
    array = da.ones((10, 4), chunks=((3, 5, 2), (4,)))
    with pytest.raises(ValueError, match="regular chunks along axis 0"):
        dask_array_to_zarr(array, tmp_path / "i.zarr")
    with pytest.raises(ValueError, match="chunked along its first 2 axes only"):
        dask_array_to_zarr(da.ones((4, 4, 4), chunks=2), tmp_path / "j.zarr")
    regular = da.arange(40.0, chunks=7).reshape(10, 4).rechunk((3, 4))
    stored = dask_array_to_zarr(regular, tmp_path / "r.zarr", progress=True, return_stored=True)
    assert stored is not None and stored.chunks == (3, 4)
    np.testing.assert_array_equal(stored[...], np.arange(40.0).reshape(10, 4))
    with pytest.raises(ValueError, match="An array exists at"):
        dask_array_to_zarr(regular, tmp_path / "r.zarr")


class _NoLenDataset(torch.utils.data.Dataset):
    """A map-style dataset without `__len__`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        return self.x[index], self.y[index]


def test_torch_dataset_to_dask_array_counts_a_dataset_without_len() -> None:
    x, y = classification_data(11)
    arrays = torch_dataset_to_dask_array(_NoLenDataset(x, y), 4)
    assert arrays[0].shape == (11, x.shape[1]) and arrays[0].chunks[0] == (4, 4, 3)
    np.testing.assert_allclose(arrays[0].compute(), x.numpy().astype(np.float32))
    with_size = torch_dataset_to_dask_array(_NoLenDataset(x, y), 4, total_size=8)
    assert with_size[1].shape == (8,)
