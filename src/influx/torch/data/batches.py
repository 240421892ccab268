"""Batches of training and test data, and iteration over data loaders.

A batch is a pair `(x, y)` of inputs and targets sharing their first (sample) dimension. Each
of `x` and `y` is a tensor or a *structure* of tensors: a dict (or any `Mapping`, such as a
tokenizer's `BatchEncoding`), a tuple or a list, nested at will, whose tensors all share the
first dimension. A data loader is any iterable of such pairs, typically a
`torch.utils.data.DataLoader`; it may also yield single `Mapping`s (the batches of a Hugging
Face data collator), whose `"labels"` entry is `y` and whose other entries are `x`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, cast

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, TensorDataset, default_collate

from ...types import Batch

__all__ = [
    "LABELS_KEY",
    "TorchBatch",
    "endless_batches",
    "iterate_batches",
    "leaves",
    "loader_items",
    "map_structure",
    "normalise_structure",
    "split_batch",
]

LABELS_KEY = "labels"
"""The entry of a `Mapping` batch that holds the targets (the Hugging Face convention)."""


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


def _paths(value: Any, name: str) -> List[Tuple[str, Any]]:
    """(printable path, leaf) for every leaf, e.g. `("x['input_ids']", tensor)`."""
    flat, _ = pytree.tree_flatten_with_path(value)
    return [(name + pytree.keystr(path), leaf) for path, leaf in flat]


def _check_structure(value: Any, name: str) -> int:
    """Check that every leaf is a tensor with a batch dimension; return the common first
    dimension."""
    entries = _paths(value, name)
    if not entries:
        raise ValueError(
            f"Parameter '{name}' must contain at least one tensor, got an empty "
            f"{type(value).__name__}."
        )
    sizes = []
    for path, leaf in entries:
        if not isinstance(leaf, torch.Tensor):
            if path == name:
                raise TypeError(
                    f"Parameter '{name}' must be a torch.Tensor, got {type(leaf).__name__}."
                )
            raise TypeError(
                f"Parameter '{name}' must be a torch.Tensor or a dict, tuple or list of "
                f"tensors; {path} is a {type(leaf).__name__}."
            )
        if leaf.ndim == 0:
            raise ValueError(
                f"Parameter '{name}' must have a batch dimension, got a scalar tensor"
                + ("." if path == name else f" at {path}.")
            )
        sizes.append((path, int(leaf.shape[0])))
    first = sizes[0][1]
    for path, size in sizes[1:]:
        if size != first:
            raise ValueError(
                f"Parameter '{name}': all tensors must share the first (sample) dimension, got "
                f"{first} for {sizes[0][0]} and {size} for {path}."
            )
    return first


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return map_structure(lambda t: tuple(t.shape), value)


@dataclass(frozen=True)
class TorchBatch(Batch):
    """Inputs `x` and targets `y` of one batch; their first dimensions must agree.

    Each of `x` and `y` is a tensor or a structure (dict, `Mapping`, tuple, list) of tensors
    sharing the first dimension; `Mapping`s are stored as dicts and lists as tuples.

    Attributes:
        x: the inputs.
        y: the targets.
        test: whether this is a test batch, whose gradients are those of the measurement of a
            [Task][influx.torch.data.task.Task] rather than of its training loss.
    """

    x: Any
    y: Any
    test: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", normalise_structure(self.x))
        object.__setattr__(self, "y", normalise_structure(self.y))
        n_x = _check_structure(self.x, "x")
        n_y = _check_structure(self.y, "y")
        if n_x != n_y:
            raise ValueError(
                "Parameters 'x' and 'y' must have the same number of samples (first "
                f"dimension), got x with shape {_shapes(self.x)} and y with shape "
                f"{_shapes(self.y)}."
            )

    def __len__(self) -> int:
        return int(leaves(self.x)[0].shape[0])

    @property
    def is_structured(self) -> bool:
        """Whether `x` is a structure of tensors rather than one tensor."""
        return not isinstance(self.x, torch.Tensor)

    def to(self, device: torch.device) -> "TorchBatch":
        """A batch on `device` (self is unchanged)."""
        return TorchBatch(
            map_structure(lambda t: t.to(device), self.x),
            map_structure(lambda t: t.to(device), self.y),
            self.test,
        )

    def as_test(self) -> "TorchBatch":
        """The same data marked as a test batch (see `test`)."""
        return TorchBatch(self.x, self.y, True)


def split_batch(batch: Any, name: str = "data", index: Optional[int] = None) -> Tuple[Any, Any]:
    """`(x, y)` from one item of a data loader: a pair, or a `Mapping` whose `"labels"` entry
    is `y` and whose other entries are `x`.

    Raises:
        TypeError: for anything else, naming the parameter `name` and the batch `index`.
    """
    where = "" if index is None else f"batch {index} is "
    if isinstance(batch, Mapping):
        if LABELS_KEY not in batch:
            raise TypeError(
                f"Parameter '{name}' must yield pairs (x, y) or mappings with a "
                f"'{LABELS_KEY}' entry; {where or 'got '}a {type(batch).__name__} with keys "
                f"{list(batch)}."
            )
        x = {key: value for key, value in batch.items() if key != LABELS_KEY}
        return x, batch[LABELS_KEY]
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"Parameter '{name}' must yield pairs (x, y) of tensors; {where or 'got '}a "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}." if isinstance(batch, (tuple, list)) else ".")
        )
    return batch[0], batch[1]


def _indexes_tensors_directly(data: Iterable) -> bool:
    """Whether `data` is a single-process `DataLoader` over a `TensorDataset` whose batches are
    collated by `default_collate`: then a batch is the dataset's tensors indexed by the batch
    sampler's indices, and can be taken as such."""
    return (
        type(data) is DataLoader
        and type(data.dataset) is TensorDataset
        and data.batch_sampler is not None
        and data.num_workers == 0
        and not data.pin_memory
        and data.collate_fn is default_collate
    )


def loader_items(data: Iterable) -> Iterator[Any]:
    """The items of a data loader, as iterating over it yields them.

    A single-process `DataLoader` over a `TensorDataset` with the default collation is read
    without collating: each batch is the dataset's tensors indexed by the next index list of
    the loader's batch sampler, which is what `default_collate` would stack item by item (the
    same values, dtypes and order, and the same draw from the loader's random generator per
    pass, so a shuffling sampler shuffles as it would). This removes a per-item Python cost
    that dominates small models.
    """
    if not _indexes_tensors_directly(data):
        yield from data
        return
    loader = cast(DataLoader, data)
    tensors = cast(TensorDataset, loader.dataset).tensors
    # a DataLoader draws one seed per pass for its workers; keep the random stream the same
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    for indices in cast(Iterable, loader.batch_sampler):
        index = torch.as_tensor(indices, dtype=torch.long)
        yield [tensor[index] for tensor in tensors]


def iterate_batches(
    data: Iterable, device: torch.device, name: str = "data"
) -> Iterator[TorchBatch]:
    """Yield the batches of a data loader as [TorchBatch][influx.torch.data.batches.TorchBatch] on
    `device`: pairs `(x, y)` or `Mapping`s with a `"labels"` entry (see
    [split_batch][influx.torch.data.batches.split_batch]); `name` is the parameter named in errors."""
    for index, batch in enumerate(loader_items(data)):
        x, y = split_batch(batch, name, index)
        yield TorchBatch(x, y).to(device)


def endless_batches(data: Iterable, device: torch.device) -> Iterator[TorchBatch]:
    """Iterate over `data` again and again (a fresh iterator per pass, so a shuffling sampler
    reshuffles).

    Raises:
        ValueError: if a pass yields no batch.
    """
    while True:
        empty = True
        for batch in iterate_batches(data, device):
            empty = False
            yield batch
        if empty:
            raise ValueError("Parameter 'data' yielded no batches.")
