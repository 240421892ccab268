"""Structures of tensors: a tensor, or dicts, tuples and lists of them, nested at will.

The batches of influx ([TorchBatch][influx.torch.data.batches.TorchBatch]) hold structures;
these functions are the few operations on them that everything else uses: normalising a
structure once (so that `torch.func` can map over it), its leaves, mapping a function over its
tensors, and taking rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List

import torch.utils._pytree as pytree

import torch

__all__ = ["leaves", "map_structure", "normalise_structure", "rows"]


def normalise_structure(value: Any) -> Any:
    """`value` with every `Mapping` that is not a plain dict (e.g. a `BatchEncoding`) turned
    into a dict and every list into a tuple, recursively, so that `torch.func` can map over it;
    tensors and other leaves are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {key: normalise_structure(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(normalise_structure(item) for item in value))
    if isinstance(value, (tuple, list)):
        return tuple(normalise_structure(item) for item in value)
    return value


def leaves(value: Any) -> List[Any]:
    """The leaves of a structure (a tensor is its own single leaf)."""
    return pytree.tree_leaves(value)  # type: ignore[no-any-return]


def map_structure(function: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """Apply `function` to every tensor of a structure, keeping the structure."""
    return pytree.tree_map(function, value)


def rows(value: Any, start: int, stop: int) -> Any:
    """The rows (samples) `start:stop` of every tensor of a structure."""
    return pytree.tree_map(lambda t: t[start:stop], value)
