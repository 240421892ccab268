r"""The functional facade: models wrapped as twice-differentiable functions of their parameters.

A [TwiceDifferentiable][influx.twice_differentiable.TwiceDifferentiable] wraps a model and a
loss $L(\theta) = \text{loss}(f_\theta(x), y)$ and gives its gradient, Hessian and
second-order directional derivatives. Together with
[solve_hvp][influx.inversion.solve_hvp] it solves $(H + \lambda I)\,x = b$ in one call. It is a
thin layer over the operators of `influx.torch`: it owns no numerical method of its own.

This module is framework-agnostic; the torch implementation is
[TorchTwiceDifferentiable][influx.torch.legacy.inversion_methods.TorchTwiceDifferentiable].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    Generator,
    Generic,
    Iterable,
    Iterator,
    List,
    Sequence,
    Tuple,
    Type,
    TypeVar,
)

__all__ = [
    "DataLoaderType",
    "InverseHvpResult",
    "ModelType",
    "TensorType",
    "TensorUtilities",
    "TwiceDifferentiable",
]

TensorType = TypeVar("TensorType", bound=Sequence)
"""Type variable for tensors, i.e. sequences of numbers."""

ModelType = TypeVar("ModelType", bound="TwiceDifferentiable")
"""Type variable for twice-differentiable models."""

DataLoaderType = TypeVar("DataLoaderType", bound=Iterable)
"""Type variable for data loaders."""


@dataclass(frozen=True)
class InverseHvpResult(Generic[TensorType]):
    r"""The solution $x$ of $A x = b$ and what the solver reports about it.

    Unpacks as a pair: `x, info = solve_hvp(...)`.

    Attributes:
        x: the solution, with the shape of $b$.
        info: solver diagnostics: the method, whether it converged, iterations and achieved
            residual where the method is iterative, and method-specific details.
    """

    x: TensorType
    info: Dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.x, self.info))


class TwiceDifferentiable(ABC, Generic[TensorType]):
    r"""A model and loss as a twice-differentiable function of the model's parameters.

    For data $(x, y)$ the wrapped function is $L(\theta) = \text{loss}(f_\theta(x), y)$ with the
    loss's mean reduction.
    """

    @classmethod
    @abstractmethod
    def tensor_type(cls) -> type:
        """The tensor type of the framework (e.g. `torch.Tensor`)."""

    @property
    @abstractmethod
    def num_params(self) -> int:
        """The number of parameters that require differentiation."""

    @property
    @abstractmethod
    def parameters(self) -> List[TensorType]:
        """The parameters that require differentiation."""

    @abstractmethod
    def grad(self, x: TensorType, y: TensorType, create_graph: bool = False) -> TensorType:
        r"""$\nabla_\theta L(\theta)$ on the data `(x, y)`, flat, shape `(P,)`.

        Args:
            x: the features $x_i$.
            y: the targets $y_i$.
            create_graph: keep the graph, for further differentiation (see `mvp`).
        """

    @abstractmethod
    def hessian(self, x: TensorType, y: TensorType) -> TensorType:
        r"""$\nabla^2_\theta L(\theta)$ on the data `(x, y)`, shape `(P, P)`."""

    @staticmethod
    @abstractmethod
    def mvp(
        grad_xy: TensorType,
        v: TensorType,
        backprop_on: TensorType,
        *,
        progress: bool = False,
    ) -> TensorType:
        r"""Second-order derivatives along directions: $\nabla_{b}\,(g^\top v_d)$ for each row $v_d$.

        Args:
            grad_xy: a gradient $g$ `(P,)` computed with `create_graph=True`.
            v: directions `(D, P)` or one direction `(P,)`.
            backprop_on: the tensor $b$ (e.g. the parameters, or the inputs $x$ for mixed
                derivatives) to differentiate $g^\top v_d$ with respect to.
            progress: show a progress bar.

        Returns:
            `(D, M)` with $M$ the number of elements of `backprop_on` (`(M,)` for one direction).
            With `backprop_on` the parameters, row $d$ is $H v_d$.
        """


class TensorUtilities(Generic[TensorType, ModelType], ABC):
    """Static tensor helpers of one framework, found from its TwiceDifferentiable type.

    Every concrete subclass must set the class attribute `twice_differentiable_type` to the
    [TwiceDifferentiable][influx.twice_differentiable.TwiceDifferentiable] subclass it serves;
    it is then registered, and
    [from_twice_differentiable][influx.twice_differentiable.TensorUtilities.from_twice_differentiable]
    finds it.
    """

    twice_differentiable_type: Type[TwiceDifferentiable]
    registry: Dict[Type[TwiceDifferentiable], Type["TensorUtilities"]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a concrete subclass under its `twice_differentiable_type`.

        Raises:
            TypeError: if `twice_differentiable_type` is missing or not a subclass of
                TwiceDifferentiable.
        """
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__abstractmethods__", None):
            return
        tdt = cls.__dict__.get("twice_differentiable_type")
        if tdt is None:
            raise TypeError(
                f"{cls.__name__} must define the class attribute 'twice_differentiable_type' "
                "(a subclass of TwiceDifferentiable)."
            )
        if not (isinstance(tdt, type) and issubclass(tdt, TwiceDifferentiable)):
            raise TypeError(
                f"{cls.__name__}.twice_differentiable_type must be a subclass of "
                f"TwiceDifferentiable, got {tdt!r}."
            )
        TensorUtilities.registry[tdt] = cls

    @staticmethod
    @abstractmethod
    def einsum(equation: str, *operands: Any) -> TensorType:
        """Sum of products of the operands' elements in Einstein notation."""

    @staticmethod
    @abstractmethod
    def cat(a: Sequence[TensorType], **kwargs: Any) -> TensorType:
        """Concatenate tensors along an existing dimension."""

    @staticmethod
    @abstractmethod
    def stack(a: Sequence[TensorType], **kwargs: Any) -> TensorType:
        """Stack tensors along a new dimension."""

    @staticmethod
    @abstractmethod
    def unsqueeze(x: TensorType, dim: int) -> TensorType:
        """Insert a dimension of size one at `dim`."""

    @staticmethod
    @abstractmethod
    def get_element(x: TensorType, idx: int) -> TensorType:
        """The element `idx` along the first dimension."""

    @staticmethod
    @abstractmethod
    def slice(x: TensorType, start: int, stop: int, axis: int = 0) -> TensorType:
        """Elements `start:stop` along `axis`."""

    @staticmethod
    @abstractmethod
    def shape(x: TensorType) -> Tuple[int, ...]:
        """The shape of `x`."""

    @staticmethod
    @abstractmethod
    def reshape(x: TensorType, shape: Tuple[int, ...]) -> TensorType:
        """`x` with another shape."""

    @staticmethod
    @abstractmethod
    def cat_gen(
        a: Generator[TensorType, None, None],
        resulting_shape: Tuple[int, ...],
        model: ModelType,
    ) -> TensorType:
        """Concatenate the tensors of a generator into one of shape `resulting_shape` (on the
        model's device)."""

    @classmethod
    def from_twice_differentiable(cls, twice_diff: TwiceDifferentiable) -> Type["TensorUtilities"]:
        """The TensorUtilities subclass registered for the type of `twice_diff`.

        Raises:
            KeyError: if none is registered for that type.
        """
        for klass in type(twice_diff).__mro__:
            if klass in cls.registry:
                return cls.registry[klass]
        raise KeyError(
            f"No TensorUtilities registered for {type(twice_diff).__name__}; registered types: "
            f"{[t.__name__ for t in cls.registry]}."
        )
