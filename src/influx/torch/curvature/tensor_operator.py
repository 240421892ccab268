r"""The operator base: linear maps on the rows of tensors, their state and their algebra.

Every operator of influx, curvature ($C$) or (approximate) inverse ($(C + \lambda I)^{-1}$),
is a [TensorOperator][influx.torch.curvature.tensor_operator.TensorOperator]. The base provides, once
for all of them:

* `apply` on a vector `(P,)` or on the rows of a matrix `(N, P)`, with input validation;
* `to(device)`, moving every tensor (and nested operator) the operator holds;
* `with_regularization(λ)`: a copy with another $\lambda$ that keeps everything fitted that
  does not depend on $\lambda$ (subclasses only say what to recompute);
* `export_state()` / `from_state` of the state protocol
  ([influx.torch.data.state][influx.torch.data.state]): the fitted state as named tensors plus
  JSON settings, and the operator rebuilt from them. This is what fit files store: no object
  graph, no code.

Regularization is an operator sum: [ShiftedOperator][influx.torch.curvature.tensor_operator.ShiftedOperator]
is $C + \lambda I$ for any curvature $C$.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, Dict, Mapping, Optional, Tuple, TypeVar, Union

import torch

from ...types import Operator, SolverDiagnostics
from ..autodiff.derivatives import flatten_dimensions
from ..data.state import OperatorState, StateContext, Stateful, restore_operator
from ..data.validation import validate_regularization
from ..gradients.bilinear import DictBilinearForm, OperatorBilinearForm

__all__ = [
    "MatrixOperator",
    "move_to_device",
    "ShiftedOperator",
    "TensorDictOperator",
    "TensorOperator",
]

_Op = TypeVar("_Op", bound="TensorOperator")
T = TypeVar("T")


def _moved(value: Any, device: torch.device, seen: Dict[int, Any]) -> Any:
    key = id(value)
    if key in seen:
        return seen[key]
    if isinstance(value, torch.Tensor):
        result: Any = value.to(device)
    elif isinstance(value, torch.device):
        result = device
    elif isinstance(value, torch.nn.Module):
        result = value.to(device)
    elif isinstance(value, Mapping) and not hasattr(value, "to"):
        result = type(value)((k, _moved(v, device, seen)) for k, v in value.items())  # type: ignore[call-arg]
    elif isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        result = type(value)(_moved(v, device, seen) for v in value)
    elif not isinstance(value, type) and callable(getattr(value, "to", None)):
        moved = value.to(device)
        result = value if moved is None else moved
    else:
        result = value
    seen[key] = result
    return result


def move_to_device(
    obj: T, device: Union[torch.device, str], seen: Optional[Dict[int, Any]] = None
) -> T:
    """Move the attributes of `obj` to `device` in place and return `obj`.

    Tensors, modules, dicts, lists and tuples of them are moved; attributes holding a device
    are set to `device`; nested objects with a `to` method are moved by it (its result
    replaces the attribute when it returns a new object). Anything else (data loaders,
    numbers, functions) is kept.
    """
    target = torch.device(device)
    memo: Dict[int, Any] = {} if seen is None else seen
    memo[id(obj)] = obj
    for name, value in list(vars(obj).items()):
        moved = _moved(value, target, memo)
        if moved is not value:
            object.__setattr__(obj, name, moved)
    return obj


class TensorOperator(Stateful, Operator[torch.Tensor, OperatorBilinearForm], ABC):
    """An operator acting on the rows of tensors whose last dimension is `input_size`.

    Subclasses implement `_apply` for a 2-D tensor `(N, input_size)`; `apply` validates the
    input and also accepts a single vector.
    """

    def _reference(self) -> Any:
        """What the operator takes its size, device and dtype from: a wrapped operator or
        batch operation, or a tensor whose first dimension is the input size. Operators that
        do not wrap anything override the three properties instead."""
        raise NotImplementedError(f"{type(self).__name__} must define input_size, device, dtype.")

    @property
    def input_size(self) -> int:
        """$P$, the size of the vectors the operator acts on."""
        reference = self._reference()
        if isinstance(reference, torch.Tensor):
            return int(reference.shape[0])
        return int(reference.input_size)

    @property
    def device(self) -> torch.device:
        """The device of the operator's tensors and results."""
        return self._reference().device  # type: ignore[no-any-return]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the operator's results."""
        return self._reference().dtype  # type: ignore[no-any-return]

    diagnostics: Optional[SolverDiagnostics] = None
    """What the solver reported on the last `apply` (None for operators that do not solve)."""

    _regularization: Optional[float] = None
    supports_regularization: bool = True
    """Whether the operator has a regularization $\\lambda$ (inverse operators do; curvature
    operators do not: their regularized form is a
    [ShiftedOperator][influx.torch.curvature.tensor_operator.ShiftedOperator])."""

    @property
    def regularization(self) -> Optional[float]:
        """The regularization $\\lambda$ of the operator, if it has one.

        Setting it changes this operator in place to what `with_regularization` returns
        (reusing what does not depend on $\\lambda$)."""
        return self._regularization

    @regularization.setter
    def regularization(self, value: Optional[float]) -> None:
        replacement = self.with_regularization(value)
        vars(self).update(vars(replacement))

    def with_regularization(self: _Op, regularization: Optional[float]) -> _Op:
        """A copy with regularization `regularization`, reusing everything fitted that does
        not depend on it (self is unchanged).

        Raises:
            NotImplementedError: for an operator without a regularization.
            ValueError: for a negative value, or one the operator cannot take.
        """
        if not self.supports_regularization:
            raise NotImplementedError(
                f"{type(self).__name__} has no regularization: use ShiftedOperator(operator, "
                "regularization) for the regularized curvature."
            )
        validate_regularization(regularization)
        self._check_regularization(regularization)
        new = copy.copy(self)
        new._regularization = regularization
        new._regularization_changed()
        return new

    def _check_regularization(self, regularization: Optional[float]) -> None:
        """Raise a ValueError for a (valid, non-negative) $\\lambda$ this operator cannot take."""

    def _regularization_changed(self) -> None:
        """Recompute what depends on $\\lambda$ after `with_regularization` (on the copy)."""

    def to(self: _Op, device: torch.device) -> _Op:
        """Move the operator (its tensors and nested operators) to `device`; return self."""
        return move_to_device(self, device)

    def _validate_tensor_input(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"Parameter 'tensor' must be a torch.Tensor, got {type(tensor).__name__}."
            )
        if tensor.ndim not in (1, 2) or tensor.shape[-1] != self.input_size:
            raise ValueError(
                f"Parameter 'tensor' must have shape ({self.input_size},) or "
                f"(N, {self.input_size}) to match the operator's input size, got "
                f"{tuple(tensor.shape)}."
            )

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Apply the operator to a vector `(P,)` or to every row of a matrix `(N, P)`."""
        self._validate_tensor_input(tensor)
        tensor = tensor.to(device=self.device)
        if tensor.ndim == 1:
            return self._apply(tensor.unsqueeze(0)).squeeze(0)
        return self._apply(tensor)

    @abstractmethod
    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Apply the operator to every row of a 2-D tensor."""

    def as_bilinear_form(self) -> OperatorBilinearForm:
        return OperatorBilinearForm(self)


class TensorDictOperator(TensorOperator, ABC):
    """A tensor operator that also acts on dictionaries of tensors by parameter name.

    Inputs must match `input_dict_structure` (shapes without the batch dimension).
    """

    @property
    @abstractmethod
    def input_dict_structure(self) -> Dict[str, Tuple[int, ...]]: ...

    def _validate_mat_dict(self, mat: Dict[str, torch.Tensor]) -> None:
        structure = self.input_dict_structure
        if not isinstance(mat, dict) or list(mat) != list(structure):
            given = list(mat) if isinstance(mat, dict) else type(mat).__name__
            raise ValueError(
                f"Parameter 'mat' must be a dict with keys {list(structure)}, got {given}."
            )
        batch_sizes = {v.shape[0] for v in mat.values()}
        for key, shape in structure.items():
            if tuple(mat[key].shape[1:]) != tuple(shape):
                raise ValueError(
                    f"Parameter 'mat': entry {key!r} must have shape (N, *{tuple(shape)}), got "
                    f"{tuple(mat[key].shape)}."
                )
        if len(batch_sizes) != 1:
            raise ValueError(
                f"Parameter 'mat': all entries must share the batch dimension, got {batch_sizes}."
            )

    def apply_to_dict(self, mat: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Apply the operator to a dictionary of tensors matching `input_dict_structure`."""
        self._validate_mat_dict(mat)
        mat = {k: v.to(self.device) for k, v in mat.items()}
        return self._apply_to_dict(mat)

    def _apply_to_dict(self, mat: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        n = next(iter(mat.values())).shape[0]
        flat = flatten_dimensions(mat.values(), shape=(n, -1))
        result = self._apply(flat)
        sizes = [v[0].numel() for v in mat.values()]
        return {
            key: chunk.reshape(mat[key].shape)
            for key, chunk in zip(mat, torch.split(result, sizes, dim=1))
        }

    def as_bilinear_form(self) -> OperatorBilinearForm:
        return DictBilinearForm(self)


class ShiftedOperator(TensorOperator):
    r"""The sum $C + \lambda I$ of a curvature operator $C$ and a multiple of the identity.

    Args:
        operator: the operator $C$.
        regularization: $\lambda \ge 0$ or None (then this is $C$).
    """

    def _reference(self) -> Any:
        return self.operator

    def __init__(self, operator: TensorOperator, regularization: Optional[float] = None):
        validate_regularization(regularization)
        self.operator = operator
        self._regularization = regularization

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        result = self.operator.apply(tensor)
        if self._regularization:
            result = result + self._regularization * tensor
        return result

    def to_dense(self) -> torch.Tensor:
        """The matrix $C + \\lambda I$ (the curvature must provide `to_dense`)."""
        dense = self.operator.to_dense().clone()  # type: ignore[attr-defined]
        dense.diagonal().add_(self._regularization or 0.0)
        return dense  # type: ignore[no-any-return]

    def export_state(self) -> OperatorState:
        return OperatorState(
            "ShiftedOperator",
            settings={"regularization": self._regularization},
            children={"operator": self.operator.export_state()},
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "ShiftedOperator":
        return cls(
            restore_operator(state.children["operator"], context),
            state.settings["regularization"],
        )


class MatrixOperator(TensorOperator):
    """A dense matrix $A$ acting on rows: $v \\mapsto A v$.

    Args:
        matrix: a square matrix `(P, P)`.
    """

    supports_regularization = False

    def _reference(self) -> Any:
        return self.matrix

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"Parameter 'matrix' must be a square matrix, got shape {tuple(matrix.shape)}."
            )
        self.matrix = matrix

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) @ self.matrix.T

    def to_dense(self) -> torch.Tensor:
        """The matrix itself."""
        return self.matrix

    def export_state(self) -> OperatorState:
        return OperatorState("MatrixOperator", tensors={"matrix": self.matrix})

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "MatrixOperator":
        return cls(state.tensors["matrix"])
