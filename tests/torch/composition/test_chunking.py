"""`influences` within a memory budget: the training side in chunks, the same values."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import torch
from helpers import classification_data, loader, make_mlp
from influx import InfluenceMode
from influx.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    ProjectedInfluence,
)
from influx.torch.composition.chunking import INFLUENCES_MEMORY_BUDGET, training_rows_per_chunk

F = torch.nn.functional

MODELS = {
    "direct": lambda net: DirectInfluence(net, F.cross_entropy, 0.1),
    "cg": lambda net: CgInfluence(net, F.cross_entropy, 0.1, rtol=1e-10),
    "arnoldi": lambda net: ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=8),
    "ekfac": lambda net: EkfacInfluence(net, True, loss=F.cross_entropy, regularization=0.1),
    "projected": lambda net: ProjectedInfluence(net, F.cross_entropy, 16, regularization=0.1),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_training_side_gives_the_same_matrix(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = classification_data(n=50)
    model: Any = MODELS[name](make_mlp()).fit(loader(x, y, 16))
    assert model.influences_memory_budget == INFLUENCES_MEMORY_BUDGET
    whole = model.influences(x[:4], y[:4], x, y)
    # 7 training points per chunk: 50 = 7 * 7 + 1
    model.influences_memory_budget = 7 * model.n_parameters * 8
    with caplog.at_level(logging.DEBUG, logger="influx.torch.composition.chunking"):
        chunked = model.influences(x[:4], y[:4], x, y)
    assert "50 training points in chunks of 7" in caplog.text
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_perturbation_mode_in_chunks() -> None:
    x, y = classification_data(n=20)
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.1).fit(loader(x, y, 8))
    whole = model.influences(x[:3], y[:3], x, y, InfluenceMode.Perturbation)
    model.influences_memory_budget = 6 * model.n_parameters * x.shape[1] * 8
    chunked = model.influences(x[:3], y[:3], x, y, InfluenceMode.Perturbation)
    assert chunked.shape == (3, 20, x.shape[1])
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_rows_per_chunk() -> None:
    assert training_rows_per_chunk(22_000, 8, 2**28) == 1525
    assert training_rows_per_chunk(10**9, 8, 1.0) == 1  # at least one row
    assert training_rows_per_chunk(10**9, 8, float("inf")) > 10**12
