"""How a task of the Dask calculator finds the fitted model.

A task receives a small handle instead of the model. Its
[resolve][influx.calculator.model_handles.ModelHandle.resolve] returns the model:

* [InstalledModel][influx.calculator.model_handles.InstalledModel] looks the model up in the
  worker plugin that installed it on every worker of the cluster (present and future), so
  that no task ever waits for a copy of the model from another, possibly busy, worker;
* [EmbeddedModel][influx.calculator.model_handles.EmbeddedModel] carries the model itself,
  for schedulers without workers (e.g. `dask.config.set(scheduler="synchronous")`).

distributed is imported only when an installed model is resolved on a worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Tuple

from ..base_influence_function_model import InfluenceFunctionModel
from .checks import ThreadSafetyViolationError

__all__ = ["EmbeddedModel", "InstalledModel", "ModelHandle", "ModelNotInstalledError"]


class ModelNotInstalledError(RuntimeError):
    """A task that needs an installed model runs where the model was not installed."""


class ModelHandle(ABC):
    """What a task of the Dask calculator holds instead of the model."""

    @abstractmethod
    def resolve(self) -> InfluenceFunctionModel:
        """The fitted model, in the process that runs the task."""


class EmbeddedModel(ModelHandle):
    """A handle that carries the model itself (embedded once in the task graph).

    Args:
        model: the fitted model.
        token: a name unique to the calculator, used by dask instead of hashing the model.
    """

    def __init__(self, model: InfluenceFunctionModel, token: str):
        self.model = model
        self.token = token

    def resolve(self) -> InfluenceFunctionModel:
        """The model carried by this handle."""
        return self.model

    def __dask_tokenize__(self) -> Tuple[str, str]:
        return ("influx-embedded-model", self.token)


class InstalledModel(ModelHandle):
    """A handle to the model installed on every worker under the plugin name `name`.

    Resolving it on a worker returns the worker's copy of the model (deserialised on first
    use). It raises, so that the computation fails instead of waiting, if the model is not
    installed on the worker, if it could not be deserialised there, or if it is not
    thread-safe and the worker runs several threads.

    Args:
        name: the name of the worker plugin that holds the model.
    """

    def __init__(self, name: str):
        self.name = name

    def resolve(self) -> InfluenceFunctionModel:
        """The model installed on the worker that runs the calling task.

        Raises:
            ModelNotInstalledError: outside a worker, or on a worker without the plugin
                (e.g. after the calculator was closed).
            ThreadSafetyViolationError: for a model that is not thread-safe on a worker with
                several threads (e.g. one that joined after the calculator was created).
        """
        from distributed import get_worker

        try:
            worker = get_worker()
        except ValueError:
            raise ModelNotInstalledError(
                f"The influence model {self.name!r} is installed on the workers of a Dask "
                "cluster: compute the results with that cluster's client, not another "
                "scheduler."
            ) from None
        plugin: Any = worker.plugins.get(self.name)
        if plugin is None:
            raise ModelNotInstalledError(
                f"The influence model {self.name!r} is not installed on worker "
                f"{worker.address}: was the calculator closed before the computation ran?"
            )
        model: InfluenceFunctionModel = plugin.model()
        n_threads = int(worker.state.nthreads)
        if n_threads > 1 and not model.is_thread_safe:
            raise ThreadSafetyViolationError({str(worker.address): n_threads})
        return model

    def __dask_tokenize__(self) -> Tuple[str, str]:
        return ("influx-installed-model", self.name)
