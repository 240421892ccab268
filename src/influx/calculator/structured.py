"""Structured inputs for the calculators: dicts, tuples and lists of arrays.

The inputs `x` (and targets `y`) of a batch may be one array or a structure of arrays (a
`Mapping`, a tuple or a list, nested at will) sharing their first (sample) axis. These helpers
see only the structure: they know nothing of the numerical framework of the arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Tuple

__all__ = [
    "LABELS_KEY",
    "first_leaf",
    "is_structured",
    "leaves_with_paths",
    "map_leaves",
    "split_item",
]

LABELS_KEY = "labels"
"""The entry of a `Mapping` batch that holds the targets (the Hugging Face convention)."""


def is_structured(value: Any) -> bool:
    """Whether `value` is a structure (a `Mapping`, tuple or list) rather than one array."""
    return isinstance(value, (Mapping, tuple, list))


def leaves_with_paths(value: Any, name: str) -> List[Tuple[str, Any]]:
    """`(path, array)` for every array of a structure, e.g. `("x['input_ids']", array)`;
    `[(name, value)]` for a single array."""
    if isinstance(value, Mapping):
        return [
            entry
            for key, item in value.items()
            for entry in leaves_with_paths(item, f"{name}[{key!r}]")
        ]
    if isinstance(value, (tuple, list)):
        return [
            entry
            for index, item in enumerate(value)
            for entry in leaves_with_paths(item, f"{name}[{index}]")
        ]
    return [(name, value)]


def map_leaves(function: Callable[[Any], Any], value: Any) -> Any:
    """Apply `function` to every array of a structure, keeping the structure (mappings become
    dicts)."""
    if isinstance(value, Mapping):
        return {key: map_leaves(function, item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_leaves(function, item) for item in value)
    return function(value)


def first_leaf(value: Any) -> Optional[Any]:
    """The first array of a structure (the value itself if it is not a structure)."""
    entries = leaves_with_paths(value, "x")
    return entries[0][1] if entries else None


def split_item(item: Any, name: str) -> Tuple[Any, Any]:
    """`(x, y)` from one item of a data iterable: a pair, or a `Mapping` whose `"labels"`
    entry is `y` and whose other entries are `x`.

    Raises:
        ValueError: for anything else, naming the parameter `name`.
    """
    if isinstance(item, Mapping):
        if LABELS_KEY not in item:
            raise ValueError(
                f"Parameter '{name}' must yield (x, y) pairs or mappings with a "
                f"'{LABELS_KEY}' entry, got a {type(item).__name__} with keys {list(item)}."
            )
        return {k: v for k, v in item.items() if k != LABELS_KEY}, item[LABELS_KEY]
    try:
        x, y = item
    except (TypeError, ValueError):
        raise ValueError(
            f"Parameter '{name}' must yield (x, y) pairs, got an item of type "
            f"{type(item).__name__}."
        ) from None
    return x, y
