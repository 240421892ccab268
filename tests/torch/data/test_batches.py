"""Reading batches from a data loader: a single-process `DataLoader` over a `TensorDataset` is
indexed directly instead of collated item by item, with the same batches and random stream."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
from torch.utils.data import DataLoader, TensorDataset

import torch
from helpers import classification_data, make_mlp, rel_err
from influx.torch import LissaInfluence
from influx.torch.data.batches import loader_items


class _Listed(TensorDataset):
    """A `TensorDataset` subclass: its items may differ from the tensors' rows, so it is
    iterated as the loader does."""

    def __getitem__(self, index: int) -> Any:
        return tuple(t[index] * 1 for t in self.tensors)


def _collated(loader: DataLoader) -> List[List[torch.Tensor]]:
    return [list(batch) for batch in loader]


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 10},
        {"batch_size": 10, "shuffle": True},
        {"batch_size": 7, "shuffle": True, "drop_last": True},
        {"batch_size": 200},
    ],
)
def test_tensor_dataset_batches_equal_the_collated_ones(options: Dict[str, Any]) -> None:
    data = TensorDataset(torch.randn(103, 3), torch.arange(103), torch.randn(103, 2, 2).double())
    torch.manual_seed(3)
    expected = _collated(DataLoader(data, **options))
    after_expected = torch.rand(4)
    torch.manual_seed(3)
    got = list(loader_items(DataLoader(data, **options)))
    after_got = torch.rand(4)
    assert len(got) == len(expected)
    for batch, reference in zip(got, expected):
        assert len(batch) == len(reference)
        for tensor, ref in zip(batch, reference):
            assert tensor.dtype == ref.dtype and torch.equal(tensor, ref)
    # the same draws from the global generator: what follows sees the same random numbers
    assert torch.equal(after_got, after_expected)


def test_loaders_that_cannot_be_indexed_are_iterated() -> None:
    data = _Listed(torch.randn(12, 3), torch.arange(12))

    def collate(items: List[Any]) -> Any:
        return [torch.stack([item[0] for item in items]) + 1, torch.stack([i[1] for i in items])]

    for loader in (
        DataLoader(data, batch_size=5),
        DataLoader(TensorDataset(*data.tensors), batch_size=5, collate_fn=collate),
        DataLoader(TensorDataset(*data.tensors), batch_size=None),
    ):
        expected = list(loader)
        got = list(loader_items(loader))
        assert len(got) == len(expected)
        for batch, reference in zip(got, expected):
            for tensor, ref in zip(batch, reference):
                assert torch.equal(tensor, ref)


def test_shuffled_lissa_is_reproducible_under_a_seed() -> None:
    """LiSSA draws its mini-batches from a shuffling loader: the same seed gives the same
    result, and it is the result of iterating the loader itself."""
    x, y = classification_data(60, 4, 3, seed=0)
    model = make_mlp(4, 5, 3, seed=0)
    loss = torch.nn.functional.cross_entropy

    def run(loader: DataLoader) -> torch.Tensor:
        torch.manual_seed(11)
        influence = LissaInfluence(model, loss, regularization=0.5, maxiter=40, scale=20.0)
        return influence.fit(loader).influences(x[:4], y[:4], x[:6], y[:6])

    data = TensorDataset(x, y)
    direct = run(DataLoader(data, batch_size=8, shuffle=True))
    again = run(DataLoader(data, batch_size=8, shuffle=True))
    collated = run(DataLoader(_Listed(x, y), batch_size=8, shuffle=True))
    assert torch.equal(direct, again)
    assert rel_err(direct, collated) < 1e-12
