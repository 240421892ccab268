"""The worker plugin that installs a fitted model on every worker of a Dask cluster.

The scheduler keeps the plugin and hands it to every worker that joins, before the worker
runs any task: workers started late (adaptive scaling) or restarted (after a crash) get the
model from the scheduler, never by a transfer from another worker that may be busy or gone.
The model travels as bytes serialised once by the client and is deserialised on a worker the
first time a task needs it.

This module imports distributed; the calculator imports it only when it is given a client.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any, Dict, Optional

from distributed import Worker
from distributed.diagnostics.plugin import WorkerPlugin

from ..base_influence_function_model import InfluenceFunctionModel

__all__ = ["ModelInstaller", "ModelLoadError"]


class ModelLoadError(RuntimeError):
    """The model could not be deserialised on a worker."""


class ModelInstaller(WorkerPlugin):
    """Holds a serialised fitted model on a worker and deserialises it once, on first use.

    Args:
        name: the plugin's name (unique per calculator); tasks find the plugin by it.
        payload: the model serialised with cloudpickle.
    """

    def __init__(self, name: str, payload: bytes):
        self.name = name
        self.payload = payload
        self._lock = threading.Lock()
        self._model: Optional[InfluenceFunctionModel] = None
        self._error: Optional[BaseException] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {"name": self.name, "payload": self.payload}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["name"], state["payload"])  # type: ignore[misc]

    def setup(self, worker: Worker) -> None:
        """Nothing to do: the model is deserialised by the first task that needs it."""

    def teardown(self, worker: Worker) -> None:
        """Drop the worker's copy of the model."""
        with self._lock:
            self._model = None

    def model(self) -> InfluenceFunctionModel:
        """The deserialised model (the same object for every task on this worker).

        Raises:
            ModelLoadError: with the deserialisation error as its cause, on every call, if
                the model could not be deserialised.
        """
        with self._lock:
            if self._model is None and self._error is None:
                try:
                    self._model = pickle.loads(self.payload)
                except Exception as error:  # any failure of user code in unpickling
                    self._error = error
            if self._error is not None:
                raise ModelLoadError(
                    f"The influence model {self.name!r} could not be deserialised on this "
                    f"worker: {type(self._error).__name__}: {self._error}"
                ) from self._error
            assert self._model is not None
            return self._model
