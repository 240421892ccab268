r"""Projected per-sample training gradients recorded while the model trains.

A [GradientRecorder][influx.torch.workflows.tracker_store.GradientRecorder] keeps, for every training
point $z_j$, the projected gradient $\tilde g_j = P \nabla_\theta \ell(z_j; \theta_t)$ at the
parameters $\theta_t$ of the last step it was recorded at (the projection $P$ of a
[ProjectedInfluence][influx.torch.models.projected.ProjectedInfluence] with the same
settings), and writes them to zarr in the format of the
[GradientStore][influx.torch.workflows.gradient_store.GradientStore] (the unpreconditioned quantity).
Opening the store fits the projected model's curvature at the current parameters, so that
queries are scored as

$$
I(z', z_j) = \tilde g'^\top (P C P^\top + \lambda I)^{-1} \tilde g_j .
$$

The rows live in memory (`n_train x k` numbers) until they are written.

**Reusing the training step's passes.** With `capture=True` the projected gradients of the
Kronecker layers (Linear, Conv2d) come from the training step itself: the layer recorder
([LayerCalls][influx.torch.kfac.signals.LayerCalls] with `training_passes=True`) keeps the
inputs $a_i$ of those layers in the loop's forward pass and the output gradients of its
backward pass, $\delta_i / B$ for a loss that is the mean over the batch of $B$ samples; the
projected per-sample gradient is then $(P_{out} \delta_i)(P_{in} a_i)^\top$ (one batched
product per layer), without a second forward or backward pass. The gradients are those at the
parameters of the step's forward pass (before the optimizer's update). When a step does not
fit (a layer called more or fewer than once, another batch size, parameters outside Kronecker
layers), the recorder computes the batch's gradients by its own pass instead. The hooks return
nothing: the training's values are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np

import torch

from ..data.batches import TorchBatch
from ..data.validation import check_positive_int
from ..kfac.signals import LayerCalls
from ..models.projected import ProjectedInfluence

if TYPE_CHECKING:  # pragma: no cover
    from .gradient_store import GradientStore

__all__ = ["GradientRecorder", "first_recording_epoch"]

logger = logging.getLogger(__name__)


def first_recording_epoch(
    store: Optional[Path], from_epoch: Optional[int], epochs: Optional[int]
) -> int:
    """The epoch from which a gradient store records: `from_epoch` if given, else the last of
    the loop's `epochs` (0 without a store).

    The default serves influence: it needs each point's gradient at (near) the final
    parameters, which the last epoch gives at a tenth of the cost of recording every step of
    ten epochs; every step (`from_epoch=0`) is for TracIn-style uses of the whole run.

    Raises:
        ValueError: if `from_epoch` is negative, `epochs` not positive, or a store records
            the last epoch (the default) without `epochs`.
    """
    if epochs is not None:
        check_positive_int(epochs, "epochs")
    if from_epoch is not None:
        if from_epoch != 0:
            check_positive_int(from_epoch, "gradient_store_from_epoch")
        return from_epoch
    if epochs is not None:
        return epochs - 1
    if store is not None:
        raise ValueError(
            "Parameter 'epochs' must be the number of epochs of the training loop when the "
            "gradient store records the last epoch (the default), got None; pass "
            "gradient_store_from_epoch=0 to record every step instead."
        )
    return 0


class GradientRecorder:
    """Projected training gradients of the batches of a training loop, by training index.

    Args:
        model: the model being trained (float32 or float64).
        loss: the loss function or [Task][influx.torch.data.task.Task].
        path: the zarr array to write.
        n_train: the number of training points (rows).
        options: keyword arguments of
            [ProjectedInfluence][influx.torch.models.projected.ProjectedInfluence]
            (`projection_dim`, `projection`, `seed`, `regularization`, ...).
        rows_per_chunk: rows per zarr chunk.
        capture: take the Kronecker layers' gradients from the training step's own forward
            and backward passes (see the module docstring).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: Any,
        path: Union[str, Path],
        n_train: int,
        options: Optional[Mapping[str, Any]] = None,
        rows_per_chunk: int = 1024,
        capture: bool = False,
    ):
        self.path, self.n_train, self.rows_per_chunk = path, int(n_train), int(rows_per_chunk)
        self.projected = ProjectedInfluence(model, loss, **dict(options or {}))
        curvature = self.projected.curvature
        assert curvature is not None
        blocks = curvature.blocks(self.projected.model, self.projected.block_structure)
        self.providers = [
            curvature.gradient_provider(  # type: ignore[attr-defined]
                self.projected.model, loss, name, params
            )
            for name, params in blocks.items()
        ]
        self.size = self.projected.factor_size
        dtype = next(p for p in model.parameters()).detach().cpu().numpy().dtype
        self.rows = np.zeros((self.n_train, self.size), dtype=dtype)
        self.recorded_at = np.full(self.n_train, -1, dtype=np.int64)
        self.captured_steps = 0
        self.layers = {
            f"{number}/{name}": layer
            for number, provider in enumerate(self.providers)
            for name, layer in provider.projection.layers.items()
        }
        self.calls: Optional[LayerCalls] = None
        if capture:
            if any(p.projection.dense is not None for p in self.providers):
                logger.info(
                    "Parameters outside Linear / Conv2d layers: the gradient store computes "
                    "its gradients by its own passes."
                )
            else:
                specs = {key: layer.spec for key, layer in self.layers.items()}
                self.calls = LayerCalls(model, specs, training_passes=True).__enter__()

    def remove_hooks(self) -> None:
        """Remove the hooks from the model (the store keeps what it recorded)."""
        if self.calls is not None:
            self.calls.__exit__(None, None, None)
            self.calls = None

    def _captured(self, n: int) -> Optional[torch.Tensor]:
        """The projected gradients of the last training step from its own passes, or None
        if they do not describe one batch of `n` samples."""
        if self.calls is None:
            return None
        calls = self.calls.calls
        if any(len(seen) != 1 or len(seen[0][0]) != n for seen in calls.values()):
            return None
        pieces = [layer.project_raw(*calls[key][0]) for key, layer in self.layers.items()]
        return torch.cat(pieces, dim=1).mul_(n)

    def record(
        self,
        x: Any,
        y: Any,
        indices: Any,
        step: int,
        context: Callable[[], Any] = contextlib.nullcontext,
    ) -> None:
        """Record the projected gradients of the batch `(x, y)` of training points `indices`:
        those captured from the training step if they fit, else those at the model's current
        parameters, computed within `context()` (e.g. one that puts the model in eval mode)."""
        index = np.asarray(torch.as_tensor(indices).reshape(-1).cpu(), dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= self.n_train):
            raise ValueError(
                f"Parameter 'indices' must hold training indices in [0, {self.n_train}), got "
                f"indices from {int(index.min())} to {int(index.max())}."
            )
        with torch.no_grad():
            grads = self._captured(len(index))
        if self.calls is not None:
            self.calls.clear()
        if grads is None:
            batch = TorchBatch(x, y).to(self.providers[0].device)
            if len(batch) != len(index):
                raise ValueError(
                    "Parameter 'indices' must have one index per sample of the batch "
                    f"({len(batch)}), got {len(index)}."
                )
            with context():
                grads = torch.cat([p.flat_grads(batch) for p in self.providers], dim=1)
        else:
            self.captured_steps += 1
        self.rows[index] = grads.detach().cpu().numpy()
        self.recorded_at[index] = step

    @property
    def missing(self) -> List[int]:
        """The training indices recorded at no step."""
        return [int(i) for i in np.flatnonzero(self.recorded_at < 0)]

    def metadata(self) -> Dict[str, Any]:
        """The store's attributes, as `GradientStore.write` records them for unpreconditioned
        gradients, and the steps the rows were recorded at."""
        from .gradient_store import RAW

        curvature: Any = self.projected.curvature
        return {
            "quantity": RAW,
            "model_class": type(self.projected).__qualname__,
            "factor_size": self.size,
            "projected_sizes": self.projected.projected_sizes,
            "projection": curvature.projection,
            "seed": curvature.seed,
            "recorded_during_training": True,
            "first_recording_step": int(self.recorded_at.min()),
            "last_recording_step": int(self.recorded_at.max()),
        }

    def write(self) -> None:
        """Write the rows to the zarr array (replacing it).

        Raises:
            ValueError: if some training points were never recorded.
        """
        from ...array.zarr_writer import ZarrChunkWriter

        missing = self.missing
        if missing:
            raise ValueError(
                f"The gradient store misses {len(missing)} training points (e.g. {missing[:5]}): "
                "pass every training batch with its indices to on_step."
            )
        bounds = list(range(0, self.n_train, self.rows_per_chunk)) + [self.n_train]
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        writer = ZarrChunkWriter(self.path, [lengths], self.metadata(), True, False)
        for number, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            writer.write((number,), ((start, end),), self.rows[start:end])
        writer.finish((self.n_train,))

    def store(self, train_data: Iterable) -> "GradientStore":
        """Write the rows, fit the projected model's curvature on `train_data` at the current
        parameters and open the store."""
        from .gradient_store import GradientStore

        self.remove_hooks()
        self.write()
        self.projected.fit(train_data)  # type: ignore[arg-type]
        return GradientStore(self.projected, self.path)
