r"""Solve $(H + \lambda I)\,x = b$ in one call, choosing the method by name.

[solve_hvp][influx.inversion.solve_hvp] dispatches on the type of the wrapped model and the
[InversionMethod][influx.inversion.InversionMethod] through the
[InversionRegistry][influx.inversion.InversionRegistry]. The torch functions registered for
each method (in `influx.torch.legacy.inversion_methods`) build the matching operator of
`influx.torch` and apply it: this module owns no numerical code.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from enum import Enum
from typing import Any, Callable, Dict, List, Tuple, Type

from .twice_differentiable import (
    DataLoaderType,
    InverseHvpResult,
    TensorType,
    TwiceDifferentiable,
)

__all__ = ["InversionMethod", "InversionRegistry", "solve_hvp"]

logger = logging.getLogger(__name__)


class InversionMethod(str, Enum):
    """The methods [solve_hvp][influx.inversion.solve_hvp] can use.

    * `Direct`: dense Hessian, factorised.
    * `Cg`: conjugate gradient on Hessian-vector products.
    * `Lissa`: the stochastic LiSSA iteration.
    * `Arnoldi`: low-rank eigen-approximation of the Hessian (Lanczos).
    * `Nystroem`: randomized Nyström sketch of the Hessian.
    * `Ekfac`: Kronecker-factored (EK-FAC) approximation of the Gauss-Newton matrix.
    * `InverseHarmonicMean`: the DataInf approximation of the inverse.
    """

    Direct = "direct"
    Cg = "cg"
    Lissa = "lissa"
    Arnoldi = "arnoldi"
    Nystroem = "nystroem"
    Ekfac = "ekfac"
    InverseHarmonicMean = "inverse_harmonic_mean"


InversionFunction = Callable[..., InverseHvpResult]


class InversionRegistry:
    """Functions solving $(H + \\lambda I) x = b$, by model type and inversion method."""

    registry: Dict[Tuple[Type[TwiceDifferentiable], InversionMethod], InversionFunction] = {}

    @classmethod
    def register(
        cls,
        model_type: Type[TwiceDifferentiable],
        inversion_method: InversionMethod,
        overwrite: bool = False,
    ) -> Callable[[InversionFunction], InversionFunction]:
        """A decorator registering a function for `model_type` and `inversion_method`.

        The function must have the signature
        `(model: model_type, training_data: DataLoader, b: tensor_type, hessian_perturbation: float = 0.0, ...)`.

        Args:
            model_type: the TwiceDifferentiable subclass the function serves.
            inversion_method: the method it implements.
            overwrite: replace an existing registration; without it, registering twice warns
                and the new function is registered anyway.

        Raises:
            TypeError: if `model_type` is not a class or `inversion_method` not an
                InversionMethod.
            ValueError: if the function's parameters do not match the required signature.
        """
        if not isinstance(model_type, type):
            raise TypeError(
                "Parameter 'model_type' must be a subclass of TwiceDifferentiable, got "
                f"{type(model_type).__name__} {model_type!r}."
            )
        if not isinstance(inversion_method, InversionMethod):
            raise TypeError(
                "Parameter 'inversion_method' must be an InversionMethod, got "
                f"{type(inversion_method).__name__} {inversion_method!r}."
            )
        key = (model_type, inversion_method)

        def decorator(func: InversionFunction) -> InversionFunction:
            cls._check_signature(func, model_type)
            if key in cls.registry and not overwrite:
                warnings.warn(
                    f"A function is already registered for {model_type.__name__} and "
                    f"{inversion_method}; replacing it. Pass overwrite=True to do so silently.",
                    UserWarning,
                    stacklevel=2,
                )

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> InverseHvpResult:
                return func(*args, **kwargs)

            cls.registry[key] = wrapper
            return wrapper

        return decorator

    @staticmethod
    def _check_signature(func: InversionFunction, model_type: Type[TwiceDifferentiable]) -> None:
        try:
            params = list(inspect.signature(func, eval_str=True).parameters.values())
        except (NameError, TypeError):
            params = list(inspect.signature(func).parameters.values())
        expected: List[Tuple[str, Any]] = [
            ("model", model_type),
            ("training_data", DataLoaderType.__bound__),
            ("b", model_type.tensor_type()),
            ("hessian_perturbation", float),
        ]
        if len(params) < len(expected):
            raise ValueError(
                f"The function to register must take the parameters {[n for n, _ in expected]} "
                f"first, got {[p.name for p in params]}."
            )
        for (name, typ), param in zip(expected, params):
            annotation = param.annotation
            if param.name != name or not (
                isinstance(annotation, type) and issubclass(annotation, typ)
            ):
                raise ValueError(
                    f"Parameter {param.name!r} of the function to register must be {name!r} of "
                    f"type {typ.__name__}, got annotation {annotation!r}."
                )

    @classmethod
    def get(
        cls, model_type: Type[TwiceDifferentiable], inversion_method: InversionMethod
    ) -> InversionFunction:
        """The function registered for `model_type` (or a base class) and the method.

        Raises:
            ValueError: if none is registered.
        """
        method = InversionMethod(inversion_method)
        for klass in model_type.__mro__:
            if (klass, method) in cls.registry:
                return cls.registry[(klass, method)]
        registered = sorted(m.value for t, m in cls.registry if issubclass(model_type, t))
        raise ValueError(
            f"No function registered for {model_type.__name__} and inversion method "
            f"{method.value!r}; registered methods for it: {registered}."
        )

    @classmethod
    def call(
        cls,
        inversion_method: InversionMethod,
        model: TwiceDifferentiable,
        training_data: DataLoaderType,
        b: TensorType,
        hessian_perturbation: float,
        **kwargs: Any,
    ) -> InverseHvpResult:
        """Call the function registered for the type of `model` and `inversion_method`."""
        return cls.get(type(model), inversion_method)(
            model, training_data, b, hessian_perturbation, **kwargs
        )


def solve_hvp(
    inversion_method: InversionMethod,
    model: TwiceDifferentiable,
    training_data: DataLoaderType,
    b: TensorType,
    *,
    hessian_perturbation: float = 0.0,
    **kwargs: Any,
) -> InverseHvpResult:
    r"""Find $x$ with $(H + \lambda I)\,x = b$, $H$ the Hessian of the mean training loss.

    $H$ is the Hessian of $\frac{1}{n}\sum_i \ell(z_i)$ over all points of `training_data`
    (each batch weighted by its size). Depending on the method it is formed and factorised
    (`Direct`), applied through Hessian-vector products (`Cg`, `Lissa`), or approximated
    (`Arnoldi`, `Nystroem`, `Ekfac`, `InverseHarmonicMean`).

    Args:
        inversion_method: the method, an [InversionMethod][influx.inversion.InversionMethod]
            or its string value.
        model: the model and loss, wrapped as a TwiceDifferentiable.
        training_data: the data the Hessian is averaged over.
        b: the right-hand side, `(P,)` or one per row `(N, P)`.
        hessian_perturbation: $\lambda \ge 0$.
        kwargs: passed to the method (e.g. `rtol`, `maxiter` for `Cg`; `rank` for `Arnoldi`).

    Returns:
        The solution (shape of `b`) and the solver's diagnostics.
    """
    try:
        method = InversionMethod(inversion_method)
    except ValueError:
        raise ValueError(
            f"Parameter 'inversion_method' must be one of {[m.value for m in InversionMethod]}, "
            f"got {inversion_method!r}."
        ) from None
    return InversionRegistry.call(
        method, model, training_data, b, hessian_perturbation=hessian_perturbation, **kwargs
    )
