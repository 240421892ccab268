r"""Recording the inputs and output gradients of `Linear` / `Conv2d` layers.

For a batch of points, [SignalRecorder][influx.torch.kfac.signals.SignalRecorder] gives every
layer's $(\tilde a, \delta)$: the layer inputs (with a 1 appended for a trainable bias;
unfolded into patches for a convolution) and the gradients of the per-sample losses with
respect to the layer outputs, in one forward and one backward pass. The calls are recorded by a
thread-local `TorchFunctionMode` around a functional evaluation of the model: the user's module
gets no hooks, and several threads can record with one model at once.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch.overrides import TorchFunctionMode

import torch

from ..autodiff.derivatives import FunctionalModel, LossOrTask
from ..autodiff.model_call import task_objective
from ..autodiff.stateless import structure_signature
from ..data.batches import TorchBatch
from .layers import LayerSpec

__all__ = ["SignalRecorder", "Signals", "UnscorableModelError", "training_signals"]

logger = logging.getLogger(__name__)

Signals = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class UnscorableModelError(RuntimeError):
    """The layers' inputs and outputs could not be recorded (a layer not called through
    `torch.nn.functional.linear` / `conv2d` with its own weight, or inputs whose first
    dimension does not index samples): the per-sample gradients are formed instead."""


class _LayerCalls(TorchFunctionMode):
    """Records the input and output of every call of `linear` / `conv2d` with a given weight."""

    def __init__(self, weights: Dict[int, str]):
        super().__init__()
        self.weights = weights
        self.calls: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {
            name: [] for name in weights.values()
        }

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear or func is torch.nn.functional.conv2d:
            weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            name = self.weights.get(id(weight))
            if name is not None:
                self.calls[name].append((args[0].detach(), result))
                # later in-place operations must not modify the tensor we differentiate against
                return result.clone()
        return result


class SignalRecorder:
    r"""Records $(\tilde a, \delta)$ of the given layers for batches of training points.

    The model's tensors are read once, on construction; every `record` is one forward and one
    backward pass of a functional evaluation of the model (the user's module is not touched).

    Args:
        model: the model.
        layers: the layers, by name.
        loss: the training loss or task.
        measurement: record the gradients of the task's measurement instead of its loss.

    Raises:
        UnscorableModelError: if a layer's weight is not among the model's parameters.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: "Dict[str, LayerSpec]",
        loss: LossOrTask,
        measurement: bool = False,
    ):
        module_names = {id(module): name for name, module in model.named_modules()}
        self.tensors = {
            name: t.detach()
            for name, t in list(model.named_parameters()) + list(model.named_buffers())
        }
        self.weights: Dict[int, str] = {}
        for name, spec in layers.items():
            prefix = module_names.get(id(spec.module), "")
            weight = self.tensors.get(f"{prefix}.weight" if prefix else "weight")
            if weight is None:
                raise UnscorableModelError(f"layer {name!r} has no weight among the parameters")
            self.weights[id(weight.requires_grad_())] = name
        self.layers = layers
        self.objective = task_objective(loss, measurement)
        self.functional = FunctionalModel(model, self.tensors, structure_signature(model))

    def record(self, batch: TorchBatch) -> Signals:
        r"""$(\tilde a, \delta)$ of every layer for `batch`.

        $\delta$ is the gradient of the per-sample loss (the batch size times the gradient of
        the mean batch loss) with respect to the layer's output. A layer called several times
        contributes its calls as further positions.

        Returns:
            per layer name, $\tilde a$ `(N, T, input_factor_dim)` and $\delta$
            `(N, T, out_dim)`.

        Raises:
            UnscorableModelError: if a layer was not called with its weight, or received inputs
                whose first dimension is not the batch size.
        """
        calls = _LayerCalls(self.weights)
        with torch.enable_grad(), calls:
            value = self.objective(self.functional, batch.x, batch.y)
        missing = [name for name, seen in calls.calls.items() if not seen]
        if missing:
            raise UnscorableModelError(f"layers {missing} were not called with their own weights")
        n = len(batch)
        for name, seen in calls.calls.items():
            for inp, _ in seen:
                if inp.shape[0] != n:
                    raise UnscorableModelError(
                        f"layer {name!r} received inputs of first dimension {inp.shape[0]}, not {n}"
                    )
        inputs = {name: [inp for inp, _ in calls.calls[name]] for name in self.layers}
        outputs = [out for name in self.layers for _, out in calls.calls[name]]
        del calls
        grads = torch.autograd.grad(value, outputs, allow_unused=True)
        deltas = iter(
            [
                torch.zeros_like(out) if grad is None else grad.detach().mul_(n)
                for grad, out in zip(grads, outputs)
            ]
        )
        # the outputs and the graph go before the inputs are expanded (unfolded patches)
        del value, outputs, grads
        result: Signals = {}
        for name, spec in self.layers.items():
            padded = (
                isinstance(spec.module, torch.nn.Conv2d) and spec.module.padding_mode != "zeros"
            )
            d = _cat([spec.output_gradients(next(deltas)) for _ in inputs[name]])
            a = _cat([spec.expanded_inputs(inp, padded) for inp in inputs.pop(name)])
            result[name] = (a, d)
        return result


def training_signals(
    model: torch.nn.Module, layers: "Dict[str, LayerSpec]", batch: TorchBatch, loss: LossOrTask
) -> Signals:
    r"""$(\tilde a, \delta)$ of every layer for one batch of training points (see
    [SignalRecorder][influx.torch.kfac.signals.SignalRecorder])."""
    return SignalRecorder(model, layers, loss).record(batch)
