r"""Recording the inputs and output gradients of `Linear` / `Conv2d` layers.

For a batch of points, [SignalRecorder][influx.torch.kfac.signals.SignalRecorder] gives every
layer's $(\tilde a, \delta)$: the layer inputs (with a 1 appended for a trainable bias;
unfolded into patches for a convolution) and the gradients of the per-sample losses with
respect to the layer outputs, in one forward and one backward pass.
[LayerCalls][influx.torch.kfac.signals.LayerCalls] records the calls: forward hooks on this
thread's structure-only copy of the model (the module a functional evaluation runs, see
[thread_structure_copy][influx.torch.autodiff.stateless.thread_structure_copy]), so the user's
module gets no hooks and several threads can record with one model at once. It is the one
recorder of layer calls: K-FAC's factors, K-FAC scoring and the Kronecker projection use it,
and, with `training_passes=True`, the gradient store recorded during training, which takes
the layers' inputs and output gradients from the training loop's own passes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ...errors import InfluxError
from ..autodiff.derivatives import FunctionalModel, LossOrTask
from ..autodiff.model_call import task_objective
from ..autodiff.stateless import StructureSignature, structure_signature, thread_structure_copy
from ..data.batches import TorchBatch
from .layers import LayerSpec

__all__ = [
    "LayerCalls",
    "LayerRecordingError",
    "SignalRecorder",
    "Signals",
    "UnscorableModelError",
    "training_signals",
]

logger = logging.getLogger(__name__)

Signals = Dict[str, Tuple[torch.Tensor, torch.Tensor]]
Objective = Callable[[Callable[..., Any], Any, Any], torch.Tensor]


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class LayerRecordingError(InfluxError, ValueError):
    """The layers' inputs and outputs could not be recorded: a layer not called by the
    model's forward pass (its parameters used functionally), inputs whose first dimension
    does not index samples, or an objective that does not depend on the layers."""


UnscorableModelError = LayerRecordingError
"""The name under which K-FAC scoring catches a failed recording (it then forms the
per-sample gradients instead)."""


_FORWARD_HOOK_REGISTRIES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
"""The registries `register_forward_hook` writes to."""


class LayerCalls:
    """Records the input and output of every call of the given layers in this thread's
    functional evaluations of `model`, while entered (a context manager).

    The hooks go on this thread's structure-only copy of the model, never on the user's
    module; each records `(input, output)` and returns a copy of the output, so that later
    in-place operations cannot modify the tensor the recorder differentiates against.

    With `training_passes=True` the recorder serves a training loop instead: while entered
    (across any number of training steps) its hooks are on the user's layers themselves, and
    every call in a differentiated pass of the user's module records `(input, output
    gradient)` once the loop's own backward pass reaches the call's output (a hook on that
    tensor). No output and no graph is kept, the hooks return nothing (the training's values
    are unchanged), and calls of influx's own copies of the module (which share its hooks),
    calls without gradient and calls whose backward pass never runs record nothing;
    [clear][influx.torch.kfac.signals.LayerCalls.clear] forgets the calls of a step.

    Args:
        model: the user's model.
        layers: the layers, by name (their `module` is a submodule of `model`).
        signature: the model's structure when the evaluation's tensors were read.
        training_passes: record the gradients of the user's own passes (see above).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: "Dict[str, LayerSpec]",
        signature: Optional[StructureSignature] = None,
        training_passes: bool = False,
    ):
        paths = {id(module): path for path, module in model.named_modules()}
        self.model, self.signature = model, signature
        self.training_passes = training_passes
        self.modules = {name: spec.module for name, spec in layers.items()}
        self.paths = {name: paths[id(spec.module)] for name, spec in layers.items()}
        self.calls: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {
            name: [] for name in layers
        }
        self._handles: List[Any] = []
        self._restore: List[Tuple[torch.nn.Module, Dict[str, Any]]] = []

    def _hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(
            module: torch.nn.Module, args: Tuple, kwargs: Dict[str, Any], output: torch.Tensor
        ) -> torch.Tensor:
            inp = args[0] if args else next(iter(kwargs.values()))
            self.calls[name].append((inp.detach(), output))
            return output.clone()

        return hook

    def _gradient_hook(self, name: str, original: torch.nn.Module) -> Callable[..., None]:
        calls = self.calls[name]

        def hook(module: torch.nn.Module, args: Tuple, kwargs: Dict[str, Any], output: Any) -> None:
            # influx's copies of the module share its hook registries: only the user's module
            if module is not original or not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad:
                return
            inp = (args[0] if args else next(iter(kwargs.values()))).detach()

            def keep(gradient: torch.Tensor) -> None:
                calls.append((inp, gradient.detach()))

            output.register_hook(keep)

        return hook

    def clear(self) -> None:
        """Forget the calls recorded so far."""
        for seen in self.calls.values():
            seen.clear()

    def __enter__(self) -> "LayerCalls":
        if self.training_passes:
            for name, module in self.modules.items():
                hook = self._gradient_hook(name, module)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            return self
        shell = thread_structure_copy(self.model, self.signature)
        for name, path in self.paths.items():
            module = shell.get_submodule(path) if path else shell
            # The copy shares the hook registries of the user's module (so that the user's
            # hooks apply to it); the recorder's hook goes into private copies of them, seen
            # by this thread's copy only, and the shared ones are put back on exit.
            shared = {key: getattr(module, key) for key in _FORWARD_HOOK_REGISTRIES}
            for key, registry in shared.items():
                setattr(module, key, type(registry)(registry))
            self._restore.append((module, shared))
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for module, shared in self._restore:
            for key, registry in shared.items():
                setattr(module, key, registry)
        self._handles, self._restore = [], []

    def check(self, n: Optional[int] = None) -> None:
        """Raise a LayerRecordingError unless every layer was called (on inputs of `n`
        samples, if given)."""
        missing = [name for name, seen in self.calls.items() if not seen]
        if missing:
            raise LayerRecordingError(
                f"Layers {missing} were not called by the model's forward pass (their "
                "parameters may be used functionally)."
            )
        for name, seen in self.calls.items():
            for inp, _ in seen:
                if n is not None and inp.shape[0] != n:
                    raise LayerRecordingError(
                        f"Layer {name!r} received inputs of first dimension {inp.shape[0]}, not "
                        f"the batch size {n}: the first dimension must index samples."
                    )


class SignalRecorder:
    r"""Records $(\tilde a, \delta)$ of the given layers for batches of points.

    The model's tensors are read once, on construction; every `record` is one forward and one
    backward pass of a functional evaluation of the model (the user's module is not touched).

    Args:
        model: the model.
        layers: the layers, by name.
        loss: the training loss or task.
        measurement: record the gradients of the task's measurement instead of its loss.
        objective: `(model, x, y) -> value` to differentiate instead of the loss (K-FAC's
            sampled Fisher draws the labels from the model's predictions).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: "Dict[str, LayerSpec]",
        loss: LossOrTask,
        measurement: bool = False,
        objective: Optional[Objective] = None,
    ):
        self.tensors = {
            name: t.detach()
            for name, t in list(model.named_parameters()) + list(model.named_buffers())
        }
        for spec in layers.values():
            for name in spec.parameter_names:
                self.tensors[name].requires_grad_()
        self.model = model
        self.layers = layers
        self.objective = objective or task_objective(loss, measurement)
        self.signature = structure_signature(model)
        self.functional = FunctionalModel(model, self.tensors, self.signature)

    def record(self, batch: TorchBatch) -> Signals:
        r"""$(\tilde a, \delta)$ of every layer for `batch`.

        $\delta$ is the gradient of the per-sample loss (the batch size times the gradient of
        the mean batch loss) with respect to the layer's output. A layer called several times
        contributes its calls as further positions.

        Returns:
            per layer name, $\tilde a$ `(N, T, input_factor_dim)` and $\delta$
            `(N, T, out_dim)`, in the model's dtype.

        Raises:
            LayerRecordingError: if a layer was not called by the forward pass, received
                inputs whose first dimension is not the batch size, or the objective does not
                depend on the layers.
        """
        calls = LayerCalls(self.model, self.layers, self.signature)
        with torch.enable_grad(), calls:
            value = self.objective(self.functional, batch.x, batch.y)
        n = len(batch)
        calls.check(n)
        if not value.requires_grad:
            raise LayerRecordingError(
                "The loss does not depend on the layers' parameters (no gradient)."
            )
        inputs = {name: [inp for inp, _ in calls.calls[name]] for name in self.layers}
        outputs = [out for name in self.layers for _, out in calls.calls[name]]
        del calls
        grads = torch.autograd.grad(value, outputs, allow_unused=True)
        # out of place: autograd may hand the same tensor to several outputs (the two calls
        # of a layer whose outputs are added), which an in-place scaling would scale twice
        deltas = iter(
            [
                torch.zeros_like(out) if grad is None else grad.detach() * n
                for grad, out in zip(grads, outputs)
            ]
        )
        # the outputs and the graph go before the inputs are expanded (unfolded patches)
        del value, outputs, grads
        result: Signals = {}
        for name, spec in self.layers.items():
            d = _cat([spec.output_gradients(next(deltas)) for _ in inputs[name]])
            a = _cat([spec.expanded_inputs(inp) for inp in inputs.pop(name)])
            result[name] = (a, d)
        return result


def training_signals(
    model: torch.nn.Module, layers: "Dict[str, LayerSpec]", batch: TorchBatch, loss: LossOrTask
) -> Signals:
    r"""$(\tilde a, \delta)$ of every layer for one batch of training points (see
    [SignalRecorder][influx.torch.kfac.signals.SignalRecorder])."""
    return SignalRecorder(model, layers, loss).record(batch)
