"""The abstract influence models and their exceptions, under the module path of the reference
API (`base_influence_function_model`).

[InfluenceFunctionModel][influx.types.InfluenceFunctionModel] and
[ComposableInfluence][influx.types.ComposableInfluence] are defined in
[influx.types][influx.types]; this module re-exports them with the exceptions a model raises.
Importing it does not import torch.
"""

from __future__ import annotations

from .errors import NotImplementedLayerRepresentationException
from .types import (
    ComposableInfluence,
    InfluenceFunctionModel,
    InfluenceMode,
    NotFittedException,
    UnsupportedInfluenceModeException,
)

__all__ = [
    "ComposableInfluence",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "NotFittedException",
    "NotImplementedLayerRepresentationException",
    "UnsupportedInfluenceModeException",
]
