"""The influence methods the command line knows: one table entry per method.

An entry names the influence model class in `influx.torch` and its default keyword
arguments. Adding a method to `influx rank` and `influx matrix` is adding one entry to
`METHODS`; `--option KEY=VALUE` passes further constructor arguments to any method.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Sequence

from .common import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..torch.composition.composable import TorchComposableInfluence

__all__ = ["METHODS", "Method", "build_influence_model", "parse_options"]


@dataclass(frozen=True)
class Method:
    """How the command line builds one influence model.

    Attributes:
        name: the value of `--method`.
        class_name: the influence model class, an attribute of `influx.torch`.
        summary: one line for `--help`.
        defaults: constructor keyword arguments that differ from the class's defaults
            (overridden by `--option`).
    """

    name: str
    class_name: str
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def model_class(self) -> type:
        """The influence model class (imports torch)."""
        from .. import torch as influx_torch

        return getattr(influx_torch, self.class_name)  # type: ignore[no-any-return]


METHODS: Dict[str, Method] = {
    method.name: method
    for method in (
        Method("direct", "DirectInfluence", "exact: dense curvature, factorised once"),
        Method("cg", "CgInfluence", "conjugate gradients on Hessian-vector products"),
        Method("lissa", "LissaInfluence", "stochastic Neumann series (LiSSA)"),
        Method("arnoldi", "ArnoldiInfluence", "low rank by Lanczos/Arnoldi", {"rank": 10}),
        Method(
            "nystroem", "NystroemSketchInfluence", "low rank by a Nystroem sketch", {"rank": 10}
        ),
        Method("ihm", "InverseHarmonicMeanInfluence", "inverse harmonic mean of rank-one terms"),
        Method("ekfac", "EkfacInfluence", "eigenvalue-corrected K-FAC", {"update_diagonal": True}),
        Method("projected", "ProjectedInfluence", "exact in a random k-dim gradient projection"),
    )
}
"""The methods of `--method`, by name."""


def methods_help() -> str:
    """One line per method, for `--help`."""
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


def parse_options(items: Sequence[str]) -> Dict[str, Any]:
    """`KEY=VALUE` strings as keyword arguments; values are Python literals or strings.

    Raises:
        UsageError: for an item without `=` or with an empty key.
    """
    options: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError("--option", f"expected KEY=VALUE (e.g. rank=20), got {item!r}")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


def build_influence_model(
    method: Method,
    model: "torch.nn.Module",
    loss: Callable[..., Any],
    regularization: float,
    options: Mapping[str, Any],
    progress: bool = False,
) -> "TorchComposableInfluence":
    """The unfitted influence model of `method` for `model` and `loss`.

    Raises:
        UsageError: for an option the class does not take, or settings the class rejects.
    """
    cls = method.model_class()
    parameters = inspect.signature(cls).parameters
    unknown: List[str] = sorted(k for k in options if k not in parameters or k in ("model", "loss"))
    if unknown:
        accepted = sorted(k for k in parameters if k not in ("model", "loss"))
        raise UsageError(
            "--option",
            f"{cls.__name__} takes no argument {', '.join(unknown)}; it takes {', '.join(accepted)}",
        )
    kwargs: Dict[str, Any] = {**method.defaults, **options, "regularization": regularization}
    if "progress" in parameters:
        kwargs.setdefault("progress", progress)
    try:
        return cls(model, loss=loss, **kwargs)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as error:
        raise UsageError(f"--method {method.name}", str(error)) from None
