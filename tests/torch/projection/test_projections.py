"""Random projections: generated once per fit, identical whatever the batching, the default
projected dimension and its documentation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import torch
from helpers import classification_data, loader, make_mlp
from influx.torch import ProjectedInfluence
from influx.torch.projection.projections import (
    DENSE_CHUNK_COLUMNS,
    DenseProjection,
    default_projection_dim,
)

F = torch.nn.functional
DOCS = Path(__file__).resolve().parents[3] / "docs" / "scale.md"


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_a_dense_projection_is_generated_once_per_fit(projection: str) -> None:
    net = make_mlp(hidden=12)
    x, y = classification_data(40)
    model = ProjectedInfluence(net, F.cross_entropy, 20, projection, regularization=0.1)
    model.fit(loader(x, y, batch_size=8))
    dense = model.projections["model"].dense
    assert dense is not None and dense.cached
    matrix = dense.matrix()
    assert dense.generations == 1
    model.influences(x[:5], y[:5], x, y)
    model.influence_factors(x[5:9], y[5:9])
    model.projected_gradients(x[:3], y[:3])
    assert dense.generations == 1
    assert dense.matrix() is matrix
    # A second fit of the same model keeps the same projection.
    model.fit(loader(x, y, batch_size=16))
    assert model.projections["model"].dense is dense and dense.generations == 1


@pytest.mark.parametrize("projection", ["kronecker", "gaussian", "rademacher"])
def test_projected_gradients_do_not_depend_on_batch_size_or_order(projection: str) -> None:
    net = make_mlp(hidden=12)
    x, y = classification_data(30)
    model = ProjectedInfluence(net, F.cross_entropy, 20, projection, regularization=0.1)
    model.fit(loader(x, y, batch_size=7))
    whole = model.projected_gradients(x, y)
    in_threes = torch.cat(
        [model.projected_gradients(x[i : i + 3], y[i : i + 3]) for i in range(0, 30, 3)]
    )
    order = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    shuffled = torch.empty_like(whole)
    shuffled[order] = model.projected_gradients(x[order], y[order])
    assert whole.shape == (30, 20)
    torch.testing.assert_close(in_threes, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(shuffled, whole, rtol=1e-12, atol=1e-14)
    # Another fit (other batches) with the same seed: the same projection.
    other = ProjectedInfluence(net, F.cross_entropy, 20, projection, regularization=0.1)
    other.fit(loader(x.flip(0), y.flip(0), batch_size=11))
    torch.testing.assert_close(other.projected_gradients(x, y), whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_over_the_budget_the_kept_chunks_and_the_regenerated_ones_make_the_same_matrix(
    distribution: str, caplog: pytest.LogCaptureFixture
) -> None:
    size, dim = 2 * DENSE_CHUNK_COLUMNS + 100, 6
    cached = DenseProjection(size, dim, distribution, 5, "block", orthogonal=False)
    with caplog.at_level(logging.WARNING):
        budget = dim * DENSE_CHUNK_COLUMNS * 8  # one chunk
        streamed = DenseProjection(size, dim, distribution, 5, "block", True, budget)
    assert not streamed.cached and not streamed.orthogonal
    assert "over the memory budget (max_cache_mb = 0); 2 of its 3 column chunks" in caplog.text
    values = torch.randn(4, size, generator=torch.Generator().manual_seed(0))
    expected = values @ cached.matrix().T
    assert cached.generations == 1
    torch.testing.assert_close(streamed.apply(values), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed.matrix(), cached.matrix(), rtol=0, atol=0)
    assert streamed.generations == 3  # the kept chunk once, then once per call above
    assert cached.generations == 1


def test_default_projection_dim_grows_with_the_model() -> None:
    assert default_projection_dim(57) == 57
    assert default_projection_dim(1024) == 1024
    assert default_projection_dim(100_000) == 1024
    assert default_projection_dim(262_144) == 1024
    assert default_projection_dim(1_100_000) == 2098
    assert default_projection_dim(11_200_000) == 6694
    assert default_projection_dim(17_000_000) == 8192
    assert default_projection_dim(10**9) == 8192
    sizes = [10**e for e in range(1, 9)]
    dims = [default_projection_dim(p) for p in sizes]
    assert dims == sorted(dims)


def test_the_default_rule_is_documented_with_its_figures() -> None:
    pages = [
        ProjectedInfluence.__doc__ or "",
        default_projection_dim.__doc__ or "",
        DOCS.read_text(),
    ]
    for page in pages:
        assert "2\\sqrt" in page
        for parameters, label in ((1_100_000, "1.1 M"), (11_200_000, "11.2 M")):
            assert f"{default_projection_dim(parameters)} at {label}" in page


def test_the_model_uses_the_default_rule_per_block() -> None:
    net = make_mlp(hidden=12)
    x, y = classification_data(20)
    model = ProjectedInfluence(net, F.cross_entropy, regularization=0.1).fit(loader(x, y))
    assert model.projection_dim is None
    assert model.factor_size == model.n_parameters == 111  # below 1024: square
    assert model.projections["model"].requested_dim == 111


def test_a_bad_size_for_the_default_rule_is_named() -> None:
    with pytest.raises(ValueError, match="'n_parameters' must be an int >= 1, got 0"):
        default_projection_dim(0)
