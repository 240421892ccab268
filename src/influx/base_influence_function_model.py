"""The abstract influence models and their exceptions, under the module path of the reference
API (`base_influence_function_model`).

[InfluenceFunctionModel][influx.types.InfluenceFunctionModel] and
[ComposableInfluence][influx.types.ComposableInfluence] are defined in
[influx.types][influx.types]; this module re-exports them with the exceptions a model raises.
Importing it does not import torch:
[NotImplementedLayerRepresentationException][influx.torch.kfac.NotImplementedLayerRepresentationException]
is loaded from `influx.torch.kfac` on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .types import (
    ComposableInfluence,
    InfluenceFunctionModel,
    InfluenceMode,
    NotFittedException,
    UnsupportedInfluenceModeException,
)

if TYPE_CHECKING:  # pragma: no cover
    from .torch.kfac import NotImplementedLayerRepresentationException


def __getattr__(name: str) -> Any:
    if name == "NotImplementedLayerRepresentationException":
        from .torch.kfac import NotImplementedLayerRepresentationException

        return NotImplementedLayerRepresentationException
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ComposableInfluence",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "NotFittedException",
    "NotImplementedLayerRepresentationException",
    "UnsupportedInfluenceModeException",
]
