"""Harmful-sample ranking and top-k influences equal their in-memory definitions."""

from __future__ import annotations

import numpy as np
import pytest

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx import NotFittedException
from influx.torch import BlockMode, DirectInfluence
from influx.torch.workflows.valuation import (
    rank_training_points,
    top_k_from_array,
    top_k_influences,
)

F = torch.nn.functional


@pytest.fixture(scope="module")
def fitted():
    x, y = classification_data(n=53)
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.1, BlockMode.LAYER_WISE)
    model.fit(loader(x, y))
    x_val, y_val = classification_data(n=9, seed=5)
    return model, x, y, x_val, y_val


def test_ranking_equals_column_sums(fitted) -> None:
    model, x, y, x_val, y_val = fitted
    full = model.influences(x_val, y_val, x, y)
    ranking = rank_training_points(model, loader(x, y, 10), loader(x_val, y_val, 4))
    assert rel_err(ranking.values, full.sum(0)) < 1e-10
    assert torch.equal(ranking.indices, torch.argsort(full.sum(0), stable=True))
    assert ranking.values[ranking.indices[0]] == ranking.values.min()
    assert ranking.most_harmful(3).tolist() == ranking.indices[:3].tolist()


@pytest.mark.parametrize("batch_size", [7, 53])
def test_top_k_equals_topk_of_full_matrix(fitted, batch_size: int) -> None:
    model, x, y, x_val, y_val = fitted
    full = model.influences(x_val, y_val, x, y)
    result = top_k_influences(model, x_val, y_val, loader(x, y, batch_size), k=5)
    best = torch.topk(full, 5, dim=1)
    worst = torch.topk(full, 5, dim=1, largest=False)
    assert rel_err(result.helpful_values, best.values) < 1e-12
    assert torch.equal(result.helpful_indices, best.indices)
    assert rel_err(result.harmful_values, worst.values) < 1e-12
    assert torch.equal(result.harmful_indices, worst.indices)
    stored = top_k_from_array(full.numpy(), k=5, column_chunk=11)
    assert torch.equal(stored.helpful_indices, best.indices)
    assert torch.equal(stored.harmful_indices, worst.indices)


def test_top_k_from_zarr_store(fitted, tmp_path) -> None:
    zarr = pytest.importorskip("zarr")
    model, x, y, x_val, y_val = fitted
    full = model.influences(x_val, y_val, x, y).numpy()
    array = zarr.create_array(
        store=str(tmp_path / "m.zarr"), shape=full.shape, chunks=(4, 8), dtype="float64"
    )
    array[:] = full
    reopened = zarr.open_array(str(tmp_path / "m.zarr"), mode="r")
    result = top_k_from_array(reopened, k=3)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :3]
    assert result.helpful_indices.tolist() == expected.tolist()


def test_errors(fitted) -> None:
    model, x, y, x_val, y_val = fitted
    with pytest.raises(ValueError, match="'k' must be a positive integer, got 0"):
        top_k_influences(model, x_val, y_val, loader(x, y), k=0)
    with pytest.raises(ValueError, match="'k' must be at most the number of training points 53"):
        top_k_influences(model, x_val, y_val, loader(x, y), k=60)
    with pytest.raises(ValueError, match=r"'influences' must be a 2-D \(n_test, n_train\)"):
        top_k_from_array(np.ones(3), k=1)
    with pytest.raises(ValueError, match="'validation_data' yielded no batches"):
        rank_training_points(model, loader(x, y), [])
    with pytest.raises(TypeError, match="'train_data' must yield pairs"):
        rank_training_points(model, [x], loader(x_val, y_val))
    with pytest.raises(NotFittedException):
        rank_training_points(DirectInfluence(make_mlp(), F.cross_entropy, 0.1), [], [])
    with pytest.raises(TypeError, match="'model' must be a torch influence model"):
        rank_training_points(object(), [], [])  # type: ignore[arg-type]
