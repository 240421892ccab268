"""Self-influences through the calculators: sequential (in memory and zarr) and Dask."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import Client

import torch
from helpers import classification_data, loader, make_mlp
from influx import DaskInfluenceCalculator, InfluenceMode, SequentialInfluenceCalculator
from influx.array import dask_array_to_zarr
from influx.torch import BlockMode, DirectInfluence, TorchCatAggregator, TorchNumpyConverter

F = torch.nn.functional


@pytest.fixture(scope="module")
def fitted():
    x, y = classification_data(n=29)
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.05, BlockMode.LAYER_WISE)
    return model.fit(loader(x, y)), x, y


@pytest.mark.parametrize("mode", list(InfluenceMode))
def test_sequential_self_influences_equal_diagonal(fitted, mode: InfluenceMode, tmp_path: Path):
    model, x, y = fitted
    full = model.influences(x, y, mode=mode)
    diagonal = torch.stack([full[i, i] for i in range(len(x))])
    lazy = SequentialInfluenceCalculator(model).self_influences(loader(x, y, 8), mode=mode)
    values = lazy.compute(aggregator=TorchCatAggregator())
    assert values.shape == diagonal.shape
    np.testing.assert_allclose(values.numpy(), diagonal.numpy(), rtol=1e-10, atol=1e-12)
    stored = lazy.to_zarr(tmp_path / "self.zarr", TorchNumpyConverter(), return_stored=True)
    assert stored is not None
    np.testing.assert_allclose(stored[...], diagonal.numpy(), rtol=1e-10, atol=1e-12)
    attrs = zarr.open_array(tmp_path / "self.zarr", mode="r").attrs["influx"]
    assert attrs["quantity"] == "self_influences" and attrs["mode"] == mode.value


def test_dask_self_influences_equal_diagonal(fitted, dask_client: Client, tmp_path: Path) -> None:
    model, x, y = fitted
    calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), dask_client)
    dx = da.from_array(x.numpy(), chunks=(8, -1))
    dy = da.from_array(y.numpy(), chunks=8)
    for mode in InfluenceMode:
        full = model.influences(x, y, mode=mode)
        diagonal = torch.stack([full[i, i] for i in range(len(x))]).numpy()
        values = calc.self_influences(dx, dy, mode=mode)
        assert values.shape == diagonal.shape and values.chunks[0] == (8, 8, 8, 5)
        np.testing.assert_allclose(values.compute(), diagonal, rtol=1e-10, atol=1e-12)
    path = tmp_path / "dask-self.zarr"
    dask_array_to_zarr(calc.self_influences(dx, dy), path)
    np.testing.assert_allclose(
        zarr.open_array(path, mode="r")[...],
        model.self_influences(x, y).numpy(),
        rtol=1e-10,
    )


def test_self_influences_errors(fitted) -> None:
    model, x, y = fitted
    from influx import UnsupportedInfluenceModeException

    with pytest.raises(UnsupportedInfluenceModeException, match="Parameter 'mode'.*'diagonal'"):
        SequentialInfluenceCalculator(model).self_influences(loader(x, y), mode="diagonal")  # type: ignore[arg-type]
