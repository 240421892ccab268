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

from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, TensorDataset, default_collate

import torch

from ...types import Batch
from .structures import leaves, map_structure, normalise_structure, rows

__all__ = [
    "LABELS_KEY",
    "TorchBatch",
    "endless_batches",
    "iterate_batches",
    "loader_items",
    "split_batch",
]

LABELS_KEY = "labels"
"""The entry of a `Mapping` batch that holds the targets (the Hugging Face convention)."""


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

    @classmethod
    def _of_checked(cls, x: Any, y: Any, test: bool) -> "TorchBatch":
        """A batch of parts that are already normalised and checked (parts of a batch, or a
        batch's parts moved or cast), made without checking them again."""
        batch = object.__new__(cls)
        object.__setattr__(batch, "x", x)
        object.__setattr__(batch, "y", y)
        object.__setattr__(batch, "test", test)
        return batch

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "TorchBatch":
        return self._of_checked(
            map_structure(function, self.x), map_structure(function, self.y), self.test
        )

    def rows(self, start: int, stop: int) -> "TorchBatch":
        """The samples `start:stop` of the batch, as a batch."""
        return self._of_checked(rows(self.x, start, stop), rows(self.y, start, stop), self.test)

    def chunks(self, size: int) -> Iterator["TorchBatch"]:
        """The batch in consecutive chunks of `size` samples (the last one may be smaller)."""
        for start in range(0, len(self), size):
            yield self.rows(start, start + size)

    def to(
        self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
    ) -> "TorchBatch":
        """A batch on `device` with its floating tensors in `dtype` (None: unchanged); self is
        unchanged."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return self._map(move)

    def as_test(self) -> "TorchBatch":
        """The same data marked as a test batch (see `test`)."""
        return self._of_checked(self.x, self.y, True)


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
