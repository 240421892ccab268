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
Kronecker layers (Linear, Conv2d) come from the training step itself: forward hooks on those
layers keep their inputs $a_i$, and hooks on their outputs keep the output gradients of the
loop's own backward pass, $\delta_i / B$ for a loss that is the mean over the batch of $B$
samples; the projected per-sample gradient is then $(P_{out} \delta_i)(P_{in} a_i)^\top$,
without a second forward or backward pass. The gradients are those at the parameters of the
step's forward pass (before the optimizer's update). When a step does not fit (a layer called
more or fewer than once, another batch size, parameters outside Kronecker layers), the
recorder computes the batch's gradients by its own pass instead. The hooks return nothing:
the training's values are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np

import torch

from ..data.batches import TorchBatch
from ..models.projected import ProjectedInfluence

if TYPE_CHECKING:  # pragma: no cover
    from .gradient_store import GradientStore

__all__ = ["GradientRecorder"]

logger = logging.getLogger(__name__)


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
        self._inputs: Dict[str, List[torch.Tensor]] = {}
        self._grads: Dict[str, List[torch.Tensor]] = {}
        self._handles: List[Any] = []
        if capture:
            if any(p.projection.dense is not None for p in self.providers):
                logger.info(
                    "Parameters outside Linear / Conv2d layers: the gradient store computes "
                    "its gradients by its own passes."
                )
            else:
                self._install_hooks()

    def _install_hooks(self) -> None:
        for number, provider in enumerate(self.providers):
            for name, layer in provider.projection.layers.items():
                key = f"{number}/{name}"
                self._inputs[key], self._grads[key] = [], []
                module = layer.spec.module
                hook = self._make_hook(module, key)
                self._handles.append(module.register_forward_hook(hook))

    def _make_hook(self, original: torch.nn.Module, key: str) -> Callable[..., None]:
        inputs, grads = self._inputs[key], self._grads[key]

        def keep_gradient(gradient: torch.Tensor) -> None:
            grads.append(gradient.detach())

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            # only the user's module (influx evaluates copies of it) in a differentiated pass
            if module is not original or not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad or not args:
                return
            inputs.append(args[0].detach())
            output.register_hook(keep_gradient)

        return hook

    def remove_hooks(self) -> None:
        """Remove the hooks from the model (the store keeps what it recorded)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _clear(self) -> None:
        for calls in list(self._inputs.values()) + list(self._grads.values()):
            calls.clear()

    def _captured(self, n: int) -> Optional[torch.Tensor]:
        """The projected gradients of the last training step from its own passes, or None
        if they do not describe one batch of `n` samples."""
        if not self._handles:
            return None
        keys = list(self._inputs)
        if any(len(self._inputs[k]) != 1 or len(self._grads[k]) != 1 for k in keys):
            return None
        if any(len(self._inputs[k][0]) != n or len(self._grads[k][0]) != n for k in keys):
            return None
        pieces = []
        for number, provider in enumerate(self.providers):
            for name, layer in provider.projection.layers.items():
                key = f"{number}/{name}"
                pieces.append(layer.project_raw(self._inputs[key][0], self._grads[key][0] * n))
        return torch.cat(pieces, dim=1)

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
        self._clear()
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
