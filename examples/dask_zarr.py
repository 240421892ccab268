"""A test-by-train influence matrix on a Dask cluster, written to zarr chunk by chunk.

Digits are tiled with small noise to a training set of `n_train` points; a
`distributed.LocalCluster` (2 workers with 2 threads each, or the cluster of a given client)
computes the `n_test x n_train` influence matrix block by block
(each test chunk's influence factors once, reused for every training chunk) and every block
is written to a zarr array as soon as it is computed, so the matrix never sits in memory.
The write is resumable: running the example again completes an interrupted array. At the end
the 5 most harmful training points of each test point are read back from the store in
column chunks (`top_k_from_array`). Run: `python examples/dask_zarr.py`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import dask.array as da
import numpy as np
import zarr
from _common import digits, train_mlp
from distributed import Client, LocalCluster
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx import DaskInfluenceCalculator
from influx.array import dask_array_to_zarr, zarr_write_status
from influx.torch import DirectInfluence, TorchNumpyConverter, top_k_from_array

logger = logging.getLogger("dask_zarr")


def main(
    n_train: int = 20_000,
    n_test: int = 500,
    chunk: int = 2_000,
    out: Path = Path("influences.zarr"),
    n_workers: int = 2,
    client: Optional[Client] = None,
) -> Path:
    """Run the example and return the path of the zarr array.

    Without `client`, a local cluster of `n_workers` worker processes (2 threads each) is
    started for the example and closed at the end.
    """
    x, y, x_test, y_test = digits(1200)
    net = train_mlp(x, y)
    model = DirectInfluence(net, torch.nn.functional.cross_entropy, regularization=0.01)
    model.fit(DataLoader(TensorDataset(x, y), batch_size=256))

    rng = np.random.default_rng(0)
    reps = -(-n_train // len(x))
    x_big = np.tile(x.numpy(), (reps, 1))[:n_train]
    x_big = x_big + 0.01 * rng.standard_normal(x_big.shape)
    y_big = np.tile(y.numpy(), reps)[:n_train]
    dx, dy = da.from_array(x_big, chunks=(chunk, -1)), da.from_array(y_big, chunks=chunk)
    test_chunk = min(chunk, n_test)
    dx_test = da.from_array(x_test.numpy()[:n_test], chunks=(test_chunk, -1))
    dy_test = da.from_array(y_test.numpy()[:n_test], chunks=test_chunk)

    with contextlib.ExitStack() as stack:
        if client is None:
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=2,
                    processes=True,
                    dashboard_address=None,
                )
            )
            client = stack.enter_context(Client(cluster))
        calculator = stack.enter_context(
            DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
        )
        values = calculator.influences(dx_test, dy_test, dx, dy)
        logger.info(
            "Writing a %s matrix (%.0f MB) in %s blocks to %s",
            values.shape,
            values.nbytes / 2**20,
            values.numblocks,
            out,
        )
        dask_array_to_zarr(values, str(out), resume=True, metadata=values.zarr_metadata)
    status = zarr_write_status(str(out))
    logger.info("Complete: %s (%d blocks)", status.complete, status.n_completed_chunks)

    top = top_k_from_array(zarr.open_array(str(out), mode="r"), k=5)
    logger.info("Most harmful training points of test point 0: %s", top.harmful_indices[0].tolist())
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
