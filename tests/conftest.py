"""Shared fixtures: float64 by default, fixed seeds, one torch thread, one Dask cluster per
session.

The models of the suite are tiny: a second torch thread only adds contention (with the Dask
workers, and on a busy machine), so the session and the workers it starts use one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

import torch
from helpers import LinearRegression

if TYPE_CHECKING:
    from distributed import Client

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def deterministic() -> Iterator[None]:
    """For tests that train a model and assert on what it learned: one torch thread and
    torch's deterministic algorithms while the test runs, whatever the session set."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


@pytest.fixture
def linreg() -> LinearRegression:
    return LinearRegression()


@pytest.fixture(scope="session")
def dask_client() -> Iterator["Client"]:
    """The one Dask cluster of the test session: 2 worker processes with 2 threads each,
    started on first use. Tests that scale or kill workers restore 2 workers before they
    end."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
