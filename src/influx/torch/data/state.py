r"""The state protocol: fitted state as named tensors and JSON settings, and the registry that
rebuilds objects from it.

Operators, preconditioners and batch operations are
[Stateful][influx.torch.data.state.Stateful]: `export_state()` returns an
[OperatorState][influx.torch.data.state.OperatorState] (a class name, named tensors, settings
and the states of the objects it is built from), and
[restore_operator][influx.torch.data.state.restore_operator] rebuilds the object from it through
a registry of the library's own classes, known by class name (never by module path, so a fit
file outlives a move of the class). What a state cannot hold (the model, the loss, the training
data) comes from a [StateContext][influx.torch.data.state.StateContext]. Fit files
([influx.torch.composition.persistence][influx.torch.composition.persistence]) store exactly
this: no object graph, no code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch

from ..autodiff.derivatives import LossOrTask

__all__ = ["OperatorState", "StateContext", "Stateful", "restore_operator"]

_REGISTRY: Dict[str, Any] = {}


@dataclass
class StateContext:
    """What an operator rebuilt from its state needs that a fit file does not hold: the
    user's model and loss, the block's parameters and, for operators that apply the curvature
    through the data (CG, LiSSA, ...), the training data."""

    model: Optional[torch.nn.Module] = None
    loss: Optional[LossOrTask] = None
    params: Optional[Mapping[str, torch.Tensor]] = None
    data: Optional[Iterable] = None
    block_name: Optional[str] = None

    def require_data(self, what: str) -> Iterable:
        """The training data, or a ValueError saying that `what` needs it."""
        if self.data is None:
            raise ValueError(
                f"Parameter 'data' is required: {what} applies the curvature through the "
                "training data; pass the training data loader to load_fit."
            )
        return self.data

    def require_model(
        self, what: str
    ) -> Tuple[torch.nn.Module, LossOrTask, Mapping[str, torch.Tensor]]:
        """The model, loss and block parameters, or a ValueError naming `what`."""
        if self.model is None or self.loss is None or self.params is None:
            raise ValueError(f"{what} needs the model, the loss and the block's parameters.")
        return self.model, self.loss, self.params


@dataclass
class OperatorState:
    """The fitted state of an operator: its class name, named tensors, JSON-serialisable
    settings and the states of the operators it is built from."""

    cls: str
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)
    children: Dict[str, "OperatorState"] = field(default_factory=dict)

    def flatten(self, prefix: str = "") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """All tensors under `prefix` (keys joined with "/") and a JSON description."""
        flat = {f"{prefix}{name}": tensor for name, tensor in self.tensors.items()}
        children = {}
        for name, child in self.children.items():
            child_flat, child_spec = child.flatten(f"{prefix}{name}/")
            flat.update(child_flat)
            children[name] = child_spec
        spec = {
            "class": self.cls,
            "settings": self.settings,
            "tensors": sorted(self.tensors),
            "children": children,
        }
        return flat, spec

    @classmethod
    def unflatten(
        cls, spec: Dict[str, Any], tensors: Dict[str, torch.Tensor], prefix: str = ""
    ) -> "OperatorState":
        """The inverse of `flatten`."""
        try:
            own = {name: tensors[f"{prefix}{name}"] for name in spec["tensors"]}
            children = {
                name: cls.unflatten(child, tensors, f"{prefix}{name}/")
                for name, child in spec["children"].items()
            }
            return cls(spec["class"], own, dict(spec["settings"]), children)
        except (KeyError, TypeError) as error:
            raise ValueError(f"Incomplete operator state under {prefix!r}: {error}") from None


class Stateful:
    """A class whose fitted state can be exported and rebuilt; registered by class name."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith("influx.") and not cls.__name__.startswith("_"):
            _REGISTRY[cls.__name__] = cls

    def export_state(self) -> OperatorState:
        """The fitted state as named tensors and JSON settings (see `restore_operator`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot export its state.")

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> Any:
        """Rebuild an object from `export_state`'s result."""
        raise NotImplementedError(f"{cls.__name__} cannot be rebuilt from a state.")


def restore_operator(state: OperatorState, context: StateContext) -> Any:
    """Rebuild the operator (or preconditioner, batch operation, ...) that exported `state`.

    Only the library's own classes are known by name; anything else is rejected.

    Raises:
        ValueError: for an unknown class name.
    """
    known = _REGISTRY.get(state.cls)
    if known is None:
        raise ValueError(
            f"Unknown operator class {state.cls!r} in the saved state: only influx's own "
            "classes can be restored."
        )
    return known.from_state(state, context)
