"""Whether a data loader yields every sample of its dataset, once, in a fixed order.

Calls that return training indices (rankings, top-k lists) and calculators that write
rows or columns need it: a shuffling sampler would make the indices point at the wrong
samples, and `drop_last=True` would leave the last samples out without a word. Fitting
needs neither (any order, any subset of batches). Framework-free: the checks read the
attributes of a torch `DataLoader` by name, without importing torch.
"""

from __future__ import annotations

from typing import Any

from .errors import UnorderedDataError

__all__ = ["check_ordered"]


def _class_names(value: Any) -> set:
    return {cls.__name__ for cls in type(value).__mro__}


def _check_complete(data: Any, batch_sampler: Any, name: str, what: str) -> None:
    if not getattr(batch_sampler if batch_sampler is not None else data, "drop_last", False):
        return
    batch_size = getattr(batch_sampler, "batch_size", None) or getattr(data, "batch_size", None)
    try:
        n_samples = len(getattr(batch_sampler, "sampler", None) or data.dataset)
    except TypeError:  # an iterable dataset: its length is unknown
        n_samples = None
    if n_samples is not None and batch_size and n_samples % batch_size == 0:
        return
    if n_samples is None or not batch_size:
        leaves_out = "it may leave out the last samples (the dataset's size is unknown)"
    else:
        leaves_out = f"it leaves out the last {n_samples % batch_size} of {n_samples} samples"
    raise UnorderedDataError(
        f"Parameter '{name}' is a data loader with drop_last=True (batch_size {batch_size}): "
        f"{leaves_out}, so {what} would not cover the dataset. Create the loader with "
        "drop_last=False (fit accepts it)."
    )


def check_ordered(data: Any, name: str, what: str = "the indices returned") -> None:
    """Raise an [UnorderedDataError][influx.errors.UnorderedDataError] unless `data` yields
    all its samples in a fixed order.

    A `DataLoader` qualifies with a `SequentialSampler` (`shuffle=False`, no sampler) or an
    iterable dataset (whose order is its own), and without `drop_last=True` on a dataset whose
    size is not a multiple of the batch size; any other sampler (random, weighted, subset) or
    a custom batch sampler does not. Lists and other iterables without a sampler are taken as
    ordered and complete.

    Args:
        data: the iterable of batches.
        name: the parameter that received it, for the message.
        what: what follows the order of its batches, for the message.
    """
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    if sampler is None and batch_sampler is None:
        return
    if batch_sampler is not None:
        if "BatchSampler" not in _class_names(batch_sampler):
            raise UnorderedDataError(
                f"Parameter '{name}' is a data loader with a custom batch sampler "
                f"({type(batch_sampler).__name__}): {what} follow the order of its batches, "
                "which influx cannot verify. Use a DataLoader with shuffle=False and no "
                "sampler (fit accepts any order)."
            )
        sampler = getattr(batch_sampler, "sampler", sampler)
    names = _class_names(sampler)
    if not ("SequentialSampler" in names or "_InfiniteConstantSampler" in names):
        hint = " (shuffle=True)" if "RandomSampler" in names else ""
        raise UnorderedDataError(
            f"Parameter '{name}' is a data loader with a {type(sampler).__name__}{hint}, "
            f"expected a SequentialSampler: {what} follow the order of its batches, which is "
            "not fixed, so they would not match the samples. Create the loader with "
            "shuffle=False and no sampler (fit accepts any order)."
        )
    _check_complete(data, batch_sampler, name, what)
