r"""A store of projected training gradients: featurize the training data once, query often.

With a fitted [ProjectedInfluence][influx.torch.models.projected.ProjectedInfluence] the
influence of training point $z_j$ on a query $z'$ is a dot product in $k$ dimensions,

$$
I(z', z_j) = \tilde g'^\top A \tilde g_j , \qquad \tilde g = P \nabla_\theta \ell ,\quad
A = (P C P^\top + \lambda I)^{-1} ,
$$

so the training data is needed once: [GradientStore.write][influx.torch.workflows.gradient_store.GradientStore.write]
(or [write_dask][influx.torch.workflows.gradient_store.GradientStore.write_dask]) computes the
$n \times k$ matrix of the training points' $A \tilde g_j$ (`preconditioned=True`, the default:
a query then needs no solve) or of their $\tilde g_j$, chunk by chunk, through the
calculators, into a zarr array that an interrupted write completes with `resume=True`. Any
later batch of queries is scored against the store with one matrix product per stored chunk,
[GradientStore.influences][influx.torch.workflows.gradient_store.GradientStore.influences], without the
training data or its model passes.

```python
# once, e.g. on a cluster
model = ProjectedInfluence(net, F.cross_entropy, projection_dim=4096, regularization=0.01)
model.fit(train_loader).save("fit.pt")
GradientStore.write(model, train_loader, "train_grads.zarr")
# later, e.g. in a notebook
model = ProjectedInfluence(net, F.cross_entropy, projection_dim=4096, regularization=0.01)
store = GradientStore(model.load_fit("fit.pt"), "train_grads.zarr")
values = store.influences(x_query, y_query)  # (n_query, n_train)
```

Inputs and targets may be structured and the loss a [Task][influx.torch.data.task.Task], as for
every model: the store holds the gradients of the task's loss, and queries are
differentiated through its measurement.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional

import numpy as np

import torch

from ...calculator import DaskInfluenceCalculator, SequentialInfluenceCalculator
from ...errors import NotFittedException
from ..data.array_converters import TorchNumpyConverter
from ..models.projected import ProjectedInfluence

if TYPE_CHECKING:  # pragma: no cover
    import dask.array
    import zarr
    from distributed import Client

__all__ = ["GradientStore"]

logger = logging.getLogger(__name__)

PRECONDITIONED = "preconditioned_projected_gradients"
RAW = "projected_gradients"


def _metadata(model: ProjectedInfluence, preconditioned: bool) -> Dict[str, Any]:
    """What the store holds, recorded in its attributes and checked on resume and on open."""
    return {
        "quantity": PRECONDITIONED if preconditioned else RAW,
        "model_class": type(model).__qualname__,
        "factor_size": model.factor_size,
        "projected_sizes": model.projected_sizes,
        "projection": model.curvature.projection,  # type: ignore[union-attr]
        "seed": model.curvature.seed,  # type: ignore[union-attr]
    }


def _check_fitted(model: Any) -> ProjectedInfluence:
    if not isinstance(model, ProjectedInfluence):
        raise TypeError(
            f"Parameter 'model' must be a ProjectedInfluence, got {type(model).__name__}."
        )
    if not model.is_fitted:
        raise NotFittedException(type(model))
    return model


class GradientStore:
    """Projected (and, by default, preconditioned) training gradients in a zarr array.

    Open a store written by [write][influx.torch.workflows.gradient_store.GradientStore.write] or
    [write_dask][influx.torch.workflows.gradient_store.GradientStore.write_dask] with the model that
    wrote it (fitted, or loaded with `load_fit`: the same projection and curvature).

    Args:
        model: a fitted [ProjectedInfluence][influx.torch.models.projected.ProjectedInfluence].
        path_or_url: the zarr array (a path, a URL understood by zarr, or a store).

    Raises:
        ValueError: if the array is incomplete (resume its write), holds something else or
            was written with another projection.
    """

    def __init__(self, model: ProjectedInfluence, path_or_url: Any):
        import zarr

        self.model = _check_fitted(model)
        self.array: "zarr.Array" = zarr.open_array(store=path_or_url, mode="r")
        info: Dict[str, Any] = dict(self.array.attrs.get("influx", {}))  # type: ignore[arg-type]
        quantity = info.get("quantity")
        if quantity not in (PRECONDITIONED, RAW):
            raise ValueError(
                f"Parameter 'path_or_url': {path_or_url!r} holds {quantity!r}, not projected "
                "training gradients."
            )
        if not info.get("complete", False):
            raise ValueError(
                f"Parameter 'path_or_url': the store at {path_or_url!r} is incomplete; complete "
                "it with GradientStore.write(..., resume=True)."
            )
        expected = _metadata(model, quantity == PRECONDITIONED)
        differing = sorted(k for k in expected if info.get(k) != expected[k])
        if differing or self.array.ndim != 2:
            details = ", ".join(
                f"{k}: stored {info.get(k)!r}, model {expected[k]!r}" for k in differing
            )
            raise ValueError(
                f"Parameter 'path_or_url': the store at {path_or_url!r} was written with another "
                f"projection ({details or f'shape {self.array.shape}'})."
            )
        self.preconditioned = quantity == PRECONDITIONED

    @property
    def n_train(self) -> int:
        """The number of stored training points."""
        return int(self.array.shape[0])

    @staticmethod
    def write(
        model: ProjectedInfluence,
        data: Iterable[Any],
        path_or_url: Any,
        preconditioned: bool = True,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = False,
    ) -> "GradientStore":
        r"""Compute the training points' projected gradients chunk by chunk with the
        [SequentialInfluenceCalculator][influx.calculator.SequentialInfluenceCalculator] and
        write them to zarr (one chunk per batch of `data`).

        Args:
            model: the fitted model.
            data: a re-iterable of training batches, without shuffling: `(x, y)` pairs (each
                a tensor or a structure of tensors) or Hugging Face collator dicts.
            path_or_url: where to write.
            preconditioned: store $A \tilde g_j$ (queries then need no solve) instead of
                $\tilde g_j$.
            overwrite: replace an existing array.
            resume: complete an interrupted write; completed chunks are not computed again.
            progress: show a progress bar.

        Returns:
            the store, open for queries.
        """
        model = _check_fitted(model)
        source = model.gradient_model(preconditioned)
        lazy = SequentialInfluenceCalculator(source).influence_factors(data)
        lazy.metadata = _metadata(model, preconditioned)
        lazy.to_zarr(
            path_or_url,
            TorchNumpyConverter(),
            overwrite=overwrite,
            resume=resume,
            progress=progress,
        )
        return GradientStore(model, path_or_url)

    @staticmethod
    def write_dask(
        model: ProjectedInfluence,
        x: "dask.array.Array",
        y: "dask.array.Array",
        path_or_url: Any,
        client: "Client",
        preconditioned: bool = True,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = False,
    ) -> "GradientStore":
        """As [write][influx.torch.workflows.gradient_store.GradientStore.write], in parallel with the
        [DaskInfluenceCalculator][influx.calculator.DaskInfluenceCalculator]: one task per
        chunk of `x` (regular chunks along the first axis), each writing its own block.

        Args:
            model: the fitted model.
            x: training inputs, a dask array chunked along the first axis, or a dict (or
                tuple) of them with the same chunks along it.
            y: training targets, chunked like `x` (an array or a structure).
            path_or_url: where to write (reachable by the workers).
            client: a `distributed.Client`.
            preconditioned: store $A \\tilde g_j$ instead of $\\tilde g_j$.
            overwrite: replace an existing array.
            resume: complete an interrupted write.
            progress: show a progress bar.
        """
        from ...array import dask_array_to_zarr

        model = _check_fitted(model)
        source = model.gradient_model(preconditioned)
        converter = TorchNumpyConverter(device=model.device)
        with DaskInfluenceCalculator(source, converter, client) as calculator:
            factors = calculator.influence_factors(x, y)
            dask_array_to_zarr(
                factors,
                path_or_url,
                overwrite=overwrite,
                resume=resume,
                metadata=_metadata(model, preconditioned),
                progress=progress,
            )
        return GradientStore(model, path_or_url)

    def query_features(self, x: Any, y: Any) -> torch.Tensor:
        r"""What the store is multiplied with: $\tilde g'$ of the queries for a preconditioned
        store, their factors $A \tilde g'$ otherwise, `(N, k)` (of a task's measurement)."""
        if self.preconditioned:
            return self.model.projected_gradients(x, y, measurement=True)
        return self.model.influence_factors(x, y)

    def influences(self, x: Any, y: Any, rows_per_read: Optional[int] = None) -> torch.Tensor:
        """The influences of every stored training point on the queries `(x, y)`,
        `(N, n_train)`, equal to `model.influences(x, y, x_train, y_train)`.

        Args:
            x: query inputs, a tensor or a structure of tensors.
            y: query targets.
            rows_per_read: stored rows read at a time (default: the store's chunks).
        """
        features = self.query_features(x, y)
        step = int(rows_per_read or self.array.chunks[0])
        if step < 1:
            raise ValueError(f"Parameter 'rows_per_read' must be >= 1, got {rows_per_read}.")
        parts = []
        for start in range(0, self.n_train, step):
            block = np.asarray(self.array[start : start + step])
            stored = torch.from_numpy(np.ascontiguousarray(block)).to(
                device=features.device, dtype=features.dtype
            )
            parts.append(features @ stored.T)
        return torch.cat(parts, dim=1)
