"""The Dask calculator never hangs: workers that join or die mid-computation, failing tasks,
models that cannot be loaded on a worker, and several threads per worker.

Every test bounds its waits with generous timeouts on futures (a hang fails the test instead
of stalling the suite); none asserts on time. The tests that scale the session's cluster down
to one worker or kill a worker run one after the other (the killed worker's replacement is
the single worker to which the next one adds a second); the cluster has 2 workers again when
the module is done.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import cloudpickle
import dask.array as da
import numpy as np
import pytest
from distributed import Client

import torch
from helpers import classification_data, loader, make_mlp
from influx import DaskInfluenceCalculator, InfluenceMode, SequentialInfluenceCalculator
from influx.calculator.model_handles import InstalledModel, ModelNotInstalledError
from influx.calculator.worker_plugin import ModelInstaller, ModelLoadError
from influx.torch import DirectInfluence, NestedTorchCatAggregator, TorchNumpyConverter

# The helper classes below travel to the worker processes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOSS = torch.nn.functional.cross_entropy
TIMEOUT = 240  # seconds; generous, only to turn a hang into a failure


class GatedDirectInfluence(DirectInfluence):
    """DirectInfluence whose influence chunks wait until a gate file exists.

    Each chunk first records that it started (a file in `started_dir`), so that the test
    knows the computation is under way, then waits for `gate_file`: the test changes the
    cluster while every remaining chunk is held back, whatever the speed of the machine.
    """

    started_dir: str = ""
    gate_file: str = ""

    def influences_from_factors(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        Path(self.started_dir, uuid.uuid4().hex).touch()
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.gate_file):
            if time.monotonic() > deadline:
                raise TimeoutError(f"The gate {self.gate_file} was never opened.")
            time.sleep(0.02)
        return super().influences_from_factors(*args, **kwargs)


class UnloadableDirectInfluence(DirectInfluence):
    """Serialises fine, fails to deserialise (e.g. a class missing on the workers)."""

    def __setstate__(self, state: Dict[str, Any]) -> None:
        raise RuntimeError("this model cannot be loaded here")


class ThreadUnsafeDirectInfluence(DirectInfluence):
    @property
    def is_thread_safe(self) -> bool:
        return False


def _data() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = classification_data(40)
    x_test, y_test = classification_data(12, seed=3)
    return x, y, x_test, y_test


def _dask(x: torch.Tensor, y: torch.Tensor, chunk: int) -> Tuple[da.Array, da.Array]:
    return da.from_array(x.numpy(), chunks=(chunk, -1)), da.from_array(y.numpy(), chunks=chunk)


def _fit(cls: type = DirectInfluence) -> Any:
    x, y, _, _ = _data()
    return cls(make_mlp(), LOSS, regularization=0.01).fit(loader(x, y))


def _n_workers(client: Client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def _wait_for_n_workers(client: Client, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _n_workers(client) != n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"The cluster did not reach {n} workers.")
        time.sleep(0.1)


def _wait_for_start(started_dir: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not any(started_dir.iterdir()):
        if time.monotonic() > deadline:
            raise TimeoutError("No influence chunk started.")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def elastic(dask_client: Client) -> Iterator[Client]:
    """The session's cluster, given two workers again when this module's tests are done."""
    try:
        yield dask_client
    finally:
        dask_client.cluster.scale(2)  # type: ignore[union-attr]
        dask_client.wait_for_workers(2, timeout=TIMEOUT)


@pytest.fixture
def one_worker(elastic: Client) -> Client:
    """The session's cluster scaled down to one worker."""
    elastic.cluster.scale(1)  # type: ignore[union-attr]
    _wait_for_n_workers(elastic, 1)
    return elastic


def _gated(tmp_path: Path) -> Tuple[GatedDirectInfluence, Path, Path]:
    model = _fit(GatedDirectInfluence)
    started, gate = tmp_path / "started", tmp_path / "gate"
    started.mkdir()
    model.started_dir, model.gate_file = str(started), str(gate)
    return model, started, gate


def test_the_only_worker_dies_mid_computation(one_worker: Client, tmp_path: Path) -> None:
    """The only worker holds the only deserialised copy of the model and the factors when it
    is killed; its nanny restarts it, the restarted worker gets the model from the scheduler
    and the computation completes."""
    client = one_worker
    model, started, gate = _gated(tmp_path)
    x, y, x_test, y_test = _data()
    gate.touch()
    reference = model.influences(x_test, y_test, x, y).numpy()
    gate.unlink()
    with DaskInfluenceCalculator(model, TorchNumpyConverter(), client) as calc:
        values = calc.influences(*_dask(x_test, y_test, 3), *_dask(x, y, 5))
        future = client.compute(values)
        _wait_for_start(started)
        (address,) = client.scheduler_info(n_workers=-1)["workers"]
        pid = client.run(os.getpid, workers=[address])[address]
        os.kill(pid, signal.SIGKILL)
        gate.touch()
        result = future.result(timeout=TIMEOUT)
    np.testing.assert_allclose(result, reference, rtol=1e-10, atol=1e-12)


def test_leaving_the_calculator_right_after_a_worker_died(one_worker: Client) -> None:
    """Closing removes the worker plugin from every worker: a worker killed just before (its
    nanny restarting it) must not make `with` raise `CommClosedError`."""
    client = one_worker
    model = _fit()
    x, y, x_test, y_test = _data()
    with DaskInfluenceCalculator(model, TorchNumpyConverter(), client) as calc:
        values = calc.influences(*_dask(x_test, y_test, 3), *_dask(x, y, 5))
        client.compute(values).result(timeout=TIMEOUT)
        (address,) = client.scheduler_info(n_workers=-1)["workers"]
        pid = client.run(os.getpid, workers=[address])[address]
        os.kill(pid, signal.SIGKILL)
    client.wait_for_workers(1, timeout=TIMEOUT)


def test_a_worker_joins_mid_computation(one_worker: Client, tmp_path: Path) -> None:
    client = one_worker
    model, started, gate = _gated(tmp_path)
    x, y, x_test, y_test = _data()
    gate.touch()
    reference = model.influences(x_test, y_test, x, y).numpy()
    gate.unlink()
    with DaskInfluenceCalculator(model, TorchNumpyConverter(), client) as calc:
        values = calc.influences(*_dask(x_test, y_test, 3), *_dask(x, y, 5))  # 4 x 8 blocks
        future = client.compute(values)
        _wait_for_start(started)
        client.cluster.scale(2)  # type: ignore[union-attr]
        client.wait_for_workers(2, timeout=TIMEOUT)
        gate.touch()
        result = future.result(timeout=TIMEOUT)
    np.testing.assert_allclose(result, reference, rtol=1e-10, atol=1e-12)


def test_a_failing_task_raises_its_error(dask_client: Client) -> None:
    model = _fit()
    x, y, x_test, y_test = _data()
    x_bad = x.clone()
    x_bad[17, 2] = float("nan")  # in the fourth of eight train chunks
    with DaskInfluenceCalculator(model, TorchNumpyConverter(), dask_client) as calc:
        values = calc.influences(*_dask(x_test, y_test, 4), *_dask(x_bad, y, 5))
        future = dask_client.compute(values)
        with pytest.raises(ValueError, match="NaN or Inf in the per-sample gradients"):
            future.result(timeout=TIMEOUT)


def test_a_model_that_cannot_be_loaded_on_the_workers_raises(dask_client: Client) -> None:
    model = _fit(UnloadableDirectInfluence)
    x, y, x_test, y_test = _data()
    with DaskInfluenceCalculator(model, TorchNumpyConverter(), dask_client) as calc:
        future = dask_client.compute(calc.influence_factors(*_dask(x_test, y_test, 4)))
        with pytest.raises(ModelLoadError, match="this model cannot be loaded here"):
            future.result(timeout=TIMEOUT)


def test_results_of_a_closed_calculator_raise(dask_client: Client) -> None:
    model = _fit()
    x, y, x_test, y_test = _data()
    calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), dask_client)
    values = calc.influence_factors(*_dask(x_test, y_test, 4))
    calc.close()
    calc.close()  # closing twice is harmless
    with pytest.raises(ModelNotInstalledError, match="is not installed on worker .* closed"):
        dask_client.compute(values).result(timeout=TIMEOUT)


def test_a_model_that_cannot_be_serialised_is_rejected(dask_client: Client) -> None:
    import threading

    model = _fit()
    model.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="'influence_function_model' must be serialisable"):
        DaskInfluenceCalculator(model, TorchNumpyConverter(), dask_client)


def test_an_unsafe_model_fails_on_a_multithreaded_worker(dask_client: Client) -> None:
    """The check at construction covers the workers present then; on a worker that joins
    later, the tasks themselves refuse a model that is not thread-safe."""
    name = f"test-unsafe-{uuid.uuid4().hex}"
    payload = cloudpickle.dumps(_fit(ThreadUnsafeDirectInfluence))
    dask_client.register_plugin(ModelInstaller(name, payload), name=name)
    try:
        future = dask_client.submit(InstalledModel(name).resolve, pure=False)
        with pytest.raises(ValueError, match="not thread-safe.*threads per worker"):
            future.result(timeout=TIMEOUT)
    finally:
        dask_client.unregister_worker_plugin(name)


@pytest.mark.parametrize("mode", list(InfluenceMode))
def test_two_threads_per_worker_equal_the_sequential_calculator(
    dask_client: Client, mode: InfluenceMode
) -> None:
    threads = {w["nthreads"] for w in dask_client.scheduler_info(n_workers=-1)["workers"].values()}
    assert threads == {2}
    model = _fit()
    x, y, x_test, y_test = _data()
    sequential = (
        SequentialInfluenceCalculator(model)
        .influences(loader(x_test, y_test, 3), loader(x, y, 5), mode=mode)
        .compute(aggregator=NestedTorchCatAggregator())
        .numpy()
    )
    with DaskInfluenceCalculator(model, TorchNumpyConverter(), dask_client) as calc:
        values = calc.influences(*_dask(x_test, y_test, 3), *_dask(x, y, 5), mode=mode)
        result = dask_client.compute(values).result(timeout=TIMEOUT)
    np.testing.assert_allclose(result, sequential, rtol=1e-10, atol=1e-12)
