r"""How a batch meets a model: calling conventions, tasks, and the perturbed input.

A batch's inputs `x` are a tensor or a structure of tensors (see
[influx.torch.data.batches][influx.torch.data.batches]). By default a model is called as
[call_model][influx.torch.autodiff.model_call.call_model] says and the loss receives
[model_outputs][influx.torch.autodiff.model_call.model_outputs]; a task (see
[Task][influx.torch.data.task.Task]) takes over both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import (
    Any,
    Callable,
    List,
    Optional,
    Protocol,
    Tuple,
    Union,
    cast,
    runtime_checkable,
)

from torch.utils import _pytree as pytree

import torch

__all__ = [
    "LossFunction",
    "LossOrTask",
    "TaskLike",
    "call_model",
    "is_data_dependent_control_flow",
    "is_task",
    "is_vmap_limitation",
    "model_outputs",
    "perturbation_entry",
    "task_objective",
    "vmap_unsupported_modules",
]

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class TaskLike(Protocol):
    """What influx needs of a task (see [Task][influx.torch.data.task.Task]): the training loss, the
    test-side measurement, both `(model, x, y) -> scalar` with mean reduction, and the input
    entry that Perturbation mode differentiates."""

    def loss(self, model: Any, x: Any, y: Any) -> torch.Tensor: ...

    def measurement(self, model: Any, x: Any, y: Any) -> torch.Tensor: ...

    def perturbation_input(self, x: Any) -> Optional[str]: ...


LossOrTask = Union[LossFunction, TaskLike]


def call_model(model: Callable[..., Any], x: Any) -> Any:
    """Call `model` on the inputs `x` of a batch: a dict (or any `Mapping`) as keyword
    arguments, `model(**x)`; a tuple or list as positional arguments, `model(*x)`; anything
    else, such as a tensor, as the single argument, `model(x)`."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def model_outputs(outputs: Any) -> Any:
    """The part of a model's outputs that a loss `loss(outputs, y)` receives: the `logits` of
    an output that has them (a Hugging Face `ModelOutput`), else the outputs themselves."""
    logits = getattr(outputs, "logits", None)
    return outputs if logits is None else logits


def is_task(loss: Any) -> bool:
    """Whether `loss` is a task (with `loss`, `measurement` and `perturbation_input`) rather
    than a function `loss(outputs, y)`."""
    return isinstance(loss, TaskLike)


def task_objective(
    loss: LossOrTask, measurement: bool = False
) -> Callable[[Callable[..., Any], Any, Any], torch.Tensor]:
    r"""$(f, x, y) \mapsto$ the mean loss of a batch for the model (callable) $f$.

    For a task, its `loss`, or its `measurement` if `measurement` is True; for a function
    `loss(outputs, y)`, `loss(model_outputs(call_model(f, x)), y)` on both sides.
    """
    if is_task(loss):
        task = cast(TaskLike, loss)
        return task.measurement if measurement else task.loss
    function = cast(LossFunction, loss)

    def objective(model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        return function(model_outputs(call_model(model, x)), y)

    return objective


def is_data_dependent_control_flow(error: BaseException) -> bool:
    """Whether `error` is `vmap`'s refusal of data-dependent Python control flow (a branch on
    a tensor's value, or `.item()`), as in the attention-mask handling of some models."""
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "data-dependent control flow" in text or "calling .item() on a Tensor" in text
    )


def is_vmap_limitation(error: BaseException) -> bool:
    """Whether `error` is one of `vmap`'s own limitations rather than a fault of the model or
    the data: data-dependent control flow (see
    [is_data_dependent_control_flow][influx.torch.autodiff.model_call.is_data_dependent_control_flow])
    or an operator without a batching rule (`"Batching rule not implemented for aten::..."`,
    e.g. the fused recurrent kernels). The same computation without `vmap` gives the values."""
    return is_data_dependent_control_flow(error) or (
        isinstance(error, RuntimeError) and "Batching rule not implemented" in str(error)
    )


RECURRENT_MODULES: Tuple[type, ...] = (torch.nn.RNNBase, torch.nn.RNNCellBase)
"""Modules whose fused kernels (`aten::lstm`, `aten::gru_cell`, ...) `vmap` cannot map over
samples: the forward pass has no batching rule and the backward pass writes in place."""


def vmap_unsupported_modules(model: torch.nn.Module) -> List[str]:
    """The names of the submodules of `model` that `vmap` cannot map over samples (the
    recurrent layers and cells of `torch.nn`, see
    [RECURRENT_MODULES][influx.torch.autodiff.model_call.RECURRENT_MODULES]); empty if there
    are none."""
    return [
        name or type(model).__name__
        for name, module in model.named_modules()
        if isinstance(module, RECURRENT_MODULES)
    ]


def perturbation_entry(x: Any, loss: LossOrTask) -> Tuple[int, str]:
    """Which tensor of the inputs `x` Perturbation mode differentiates: its index among the
    leaves of `x` and a printable path.

    The task's `perturbation_input(x)` names it (a key of a dict, an index of a tuple, dotted
    for nested structures); if it returns None (or for a plain loss), `x` itself if it is a
    tensor, else its only floating-point tensor.

    Raises:
        ValueError: if the named entry does not exist, several floating-point entries qualify,
            or the entry is not floating-point (Perturbation mode differentiates with respect
            to the input's values).
    """
    flat, _ = pytree.tree_flatten_with_path(x)
    paths = [".".join(_key_name(k) for k in path) for path, _ in flat]
    tensors = [leaf for _, leaf in flat]
    shown = ["x" + pytree.keystr(path) for path, _ in flat]
    hook = "Task.perturbation_input"
    requested = cast(TaskLike, loss).perturbation_input(x) if is_task(loss) else None
    if requested is not None:
        if requested not in paths:
            raise ValueError(
                f"{hook} returned {requested!r}, which is not an entry of x (entries: {paths})."
            )
        index = paths.index(requested)
    elif len(tensors) == 1:
        index = 0
    else:
        floating = [i for i, t in enumerate(tensors) if torch.is_floating_point(t)]
        if len(floating) != 1:
            dtypes = ", ".join(f"{shown[i]}: {tensors[i].dtype}" for i in range(len(tensors)))
            problem = "no" if not floating else "several"
            raise ValueError(
                f"Perturbation mode differentiates with respect to one floating-point input, "
                f"but x has {problem} floating-point tensor ({dtypes}): pass the input as "
                f"floating-point values (e.g. inputs_embeds) and name it with {hook}."
            )
        index = floating[0]
    if not torch.is_floating_point(tensors[index]):
        raise ValueError(
            f"Perturbation mode differentiates with respect to a floating-point input, but "
            f"{shown[index]} has dtype {tensors[index].dtype}: pass the input as "
            f"floating-point values (e.g. inputs_embeds instead of token ids) and name it "
            f"with {hook}."
        )
    return index, shown[index]


def _key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
