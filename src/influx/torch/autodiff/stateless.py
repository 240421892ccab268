r"""Evaluating a module functionally without touching it.

Every functional evaluation of the user's model goes through
[functional_forward][influx.torch.autodiff.stateless.functional_forward], which runs the forward pass
of a structure-only copy of the module (one per thread, whose parameters are placeholders
replaced by the given tensors). A fitted influence model can therefore be pickled, saved or
used from another thread while it computes. torch keeps the state of forward-mode
differentiation (`jvp`) per process, not per thread: functions built on it are wrapped in
[ForwardModeSerialised][influx.torch.autodiff.stateless.ForwardModeSerialised] and run one thread at a
time, the reverse-mode ones in parallel.

Some attention kernels (the flash and memory-efficient kernels of
`torch.nn.functional.scaled_dot_product_attention`, the default attention of Hugging Face
models) have a backward pass without a derivative of its own, so second derivatives through
them fail. [MathAttentionOnFailure][influx.torch.autodiff.stateless.MathAttentionOnFailure]
runs such a computation again with the math kernel, which computes the same attention with
differentiable operations.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import torch

__all__ = [
    "ForwardModeSerialised",
    "MathAttentionOnFailure",
    "is_missing_attention_derivative",
    "StructureSignature",
    "functional_forward",
    "structure_signature",
    "thread_structure_copy",
]

logger = logging.getLogger(__name__)

ParamDict = Dict[str, torch.Tensor]
StructureSignature = Tuple[Tuple[str, type, Tuple[str, ...], Tuple[str, ...]], ...]


def structure_signature(model: torch.nn.Module) -> StructureSignature:
    """The module tree as names and types of submodules and of their parameters and buffers."""
    return tuple(
        (name, type(module), tuple(module._parameters), tuple(module._buffers))
        for name, module in model.named_modules(remove_duplicate=False)
    )


def _placeholder(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A tensor without storage (device `meta`) with the shape and dtype of `tensor`."""
    if tensor is None:
        return None
    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
    return empty


def _structure_copy(module: torch.nn.Module, memo: Dict[int, Any]) -> torch.nn.Module:
    """A copy of `module` sharing its code and settings but none of its tensors.

    Submodules are copied recursively, parameters and buffers are replaced by placeholders
    (shared objects stay shared, so tied weights stay tied), and the containers of the module
    are copied (but for its hook registries), so that swapping tensors into the copy never
    changes the original.
    """
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[no-any-return]
    cls = type(module)
    shell = cls.__new__(cls)  # no __init__, no __getstate__ (parametrized modules refuse it)
    memo[id(module)] = shell
    state = shell.__dict__
    for key, value in module.__dict__.items():
        # Containers the forward pass may write (tensor dicts, weight lists of recurrent
        # layers) are the copy's own; hook registries stay shared, so that hooks added to or
        # removed from the module apply to the copy as they would to the module.
        own = isinstance(value, (dict, list, set)) and "hooks" not in key
        state[key] = copy.copy(value) if own else value
    for kind in ("_parameters", "_buffers"):
        tensors = state[kind]
        for name, tensor in tensors.items():
            if tensor is not None and id(tensor) not in memo:
                memo[id(tensor)] = _placeholder(tensor)
            tensors[name] = None if tensor is None else memo[id(tensor)]
    children = state["_modules"]
    for name, child in children.items():
        children[name] = None if child is None else _structure_copy(child, memo)
    return shell


class _StructureCopies(threading.local):
    """Per thread: the structure-only copy of each module, with the module's structure when
    the copy was made. Keys are weak: a copy goes when its module goes."""

    def __init__(self) -> None:
        self.copies: "weakref.WeakKeyDictionary[torch.nn.Module, Tuple[StructureSignature, torch.nn.Module, List[torch.nn.Module]]]" = weakref.WeakKeyDictionary()


_STRUCTURE_COPIES = _StructureCopies()


def _thread_structure_copy(
    model: torch.nn.Module, signature: StructureSignature
) -> torch.nn.Module:
    """This thread's structure-only copy of `model` (built on first use, rebuilt if the
    module's structure changed), with the train/eval flags of `model`'s submodules."""
    copies = _STRUCTURE_COPIES.copies
    entry = copies.get(model)
    if entry is None or entry[0] != signature:
        try:
            shell = _structure_copy(model, {})
        except Exception as error:  # a module type that cannot be rebuilt from its state
            logger.warning(
                "Cannot copy the structure of %s (%s: %s): evaluating the module itself, whose "
                "parameters are swapped while a computation runs (not thread-safe).",
                type(model).__name__,
                type(error).__name__,
                error,
            )
            shell = model
        entry = (signature, shell, list(shell.modules()))
        copies[model] = entry
    _, shell, shell_modules = entry
    for original, duplicate in zip(model.modules(), shell_modules):
        duplicate.training = original.training
    return shell


def thread_structure_copy(
    model: torch.nn.Module, signature: Optional[StructureSignature] = None
) -> torch.nn.Module:
    """The module [functional_forward][influx.torch.autodiff.stateless.functional_forward] runs
    in this thread for `model`: its structure-only copy (`model` itself if its structure cannot
    be copied). Hooks registered on it see this thread's functional evaluations only."""
    return _thread_structure_copy(
        model, structure_signature(model) if signature is None else signature
    )


def functional_forward(
    model: torch.nn.Module,
    tensors: ParamDict,
    args: Tuple[Any, ...],
    signature: Optional[StructureSignature] = None,
    kwargs: Optional[Dict[str, Any]] = None,
) -> Any:
    r"""$f_\theta(\text{args})$ with the parameters and buffers in `tensors`, without touching
    `model`.

    The forward pass runs on this thread's structure-only copy of `model` (see the module
    docstring), through `torch.func.functional_call`, so it composes with `grad`, `vmap` and
    `jvp`. The user's module is never modified (only its train/eval flags are read), and
    several threads can evaluate the same module at once.

    Args:
        model: the module whose forward pass is evaluated.
        tensors: every parameter and buffer of `model` by name (tied parameters under one of
            their names).
        args: the positional arguments of the forward pass.
        signature: the module's structure when the caller read its tensors (computed if
            None); a copy made for another structure is rebuilt.
        kwargs: the keyword arguments of the forward pass.
    """
    if signature is None:
        signature = structure_signature(model)
    return functional_call(_thread_structure_copy(model, signature), tensors, args, kwargs)


_FORWARD_MODE_LOCK = threading.RLock()
"""Held while a function that uses forward-mode derivatives (`torch.func.jvp`) runs: torch
keeps the levels of forward-mode AD in process-wide state, so two threads must not use them
at the same time. Reverse-mode functions (per-sample gradients) run concurrently."""


class ForwardModeSerialised:
    """Wraps a function that uses forward-mode derivatives so that one thread at a time runs
    it (see the module docstring); any other function runs in parallel with it.

    Args:
        function: the function to wrap.
    """

    def __init__(self, function: Callable[..., Any]):
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _FORWARD_MODE_LOCK:
            return self.function(*args, **kwargs)


def is_missing_attention_derivative(error: BaseException) -> bool:
    """Whether `error` is torch's refusal to differentiate the backward pass of a fused
    attention kernel (`derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented`, and the same for the other kernels), or to push a forward-mode
    derivative through it (`Trying to use forward AD with _scaled_dot_product_...`)."""
    text = str(error)
    return (
        isinstance(error, (RuntimeError, NotImplementedError))
        and "scaled_dot_product" in text
        and ("not implemented" in text or "forward AD" in text)
    )


_LOGGED_MATH_ATTENTION: set = set()


class MathAttentionOnFailure:
    r"""Wraps a function of second derivatives of a model (Hessian-vector products, dense
    Hessians, Gauss-Newton products): if it fails because an attention kernel has no
    second derivative (see
    [is_missing_attention_derivative][influx.torch.autodiff.stateless.is_missing_attention_derivative]),
    it runs again, and from then on always, with
    `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`: the math kernel computes
    $\operatorname{softmax}(QK^\top / \sqrt{d} + M)\,V$ with differentiable operations, the
    same values as the fused kernels. The first switch of each kind is logged (once per
    process). The kernel choice is process-wide state in torch, so the math-kernel runs hold
    the same lock as [ForwardModeSerialised][influx.torch.autodiff.stateless.ForwardModeSerialised].

    Args:
        function: the function to wrap.
        what: what it computes, for the log line.
    """

    def __init__(self, function: Callable[..., Any], what: str = "Hessian products"):
        self.function = function
        self.what = what
        self.math_attention = False
        """Whether the math kernel is used (after the first failure)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.math_attention:
            try:
                return self.function(*args, **kwargs)
            except (RuntimeError, NotImplementedError) as error:
                if not is_missing_attention_derivative(error):
                    raise
                self.math_attention = True
                if self.what not in _LOGGED_MATH_ATTENTION:
                    _LOGGED_MATH_ATTENTION.add(self.what)
                    logger.info(
                        "%s: the model's scaled-dot-product attention kernel has no second "
                        "derivative (%s); taking the math kernel instead "
                        "(sdpa_kernel(SDPBackend.MATH)), which gives the same values.",
                        self.what,
                        str(error).split("\n")[0],
                    )
        with _FORWARD_MODE_LOCK, sdpa_kernel(SDPBackend.MATH):
            return self.function(*args, **kwargs)
