"""The distortion estimate of a projection: its closed form, exactness at full dimension, and
the warning when the projection is too small for the gradients."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import torch
from helpers import classification_data, loader, make_mlp
from influx.torch import ProjectedInfluence
from influx.torch.projection import distortion
from influx.torch.projection.distortion import (
    DISTORTION_THRESHOLD,
    distortion_from_gradients,
    probe_influences,
)

F = torch.nn.functional


def test_probe_influences_equal_the_explicit_inverse_of_the_empirical_fisher() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(10, 7, generator=gen)
    lam, n_curvature = 0.3, 5
    fisher = grads[:n_curvature].T @ grads[:n_curvature] / n_curvature
    probe = grads[n_curvature:]
    expected = probe @ torch.linalg.solve(fisher + lam * torch.eye(7), probe.T)
    actual = probe_influences(grads @ grads.T, n_curvature, lam) / lam
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_an_orthogonal_square_projection_has_no_distortion_and_a_small_one_has_much() -> None:
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(16, 200, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen))
    exact = distortion_from_gradients(grads, grads @ rotation, 0.01)
    assert exact.distortion < 1e-10 and exact.reliable and exact.suggested_dim == 200
    small = torch.randn(5, 200, generator=gen) / 5**0.5
    estimate = distortion_from_gradients(grads, grads @ small.T, 0.01)
    assert estimate.distortion > 0.9 and not estimate.reliable
    expected = min(
        200, int(torch.tensor(5 * (2 * estimate.distortion / DISTORTION_THRESHOLD) ** 2).ceil())
    )
    assert estimate.suggested_dim == expected and estimate.samples == 16
    assert estimate.n_parameters == 200 and estimate.projection_dim == 5


def test_too_few_gradients_are_named() -> None:
    with pytest.raises(ValueError, match="the same number m >= 4 of gradients, got 3 and 3"):
        distortion_from_gradients(torch.ones(3, 5), torch.ones(3, 2), 0.1)


def test_a_full_dimension_projection_reports_no_distortion_and_does_not_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = make_mlp()
    x, y = classification_data(40)
    with caplog.at_level(logging.WARNING):
        model = ProjectedInfluence(net, F.cross_entropy, regularization=0.1).fit(loader(x, y))
    estimate = model.projection_distortion["model"]
    assert estimate is not None and estimate.distortion < 1e-10 and estimate.samples == 32
    assert estimate.projection_dim == estimate.n_parameters == 57
    assert "distorts influence" not in caplog.text
    diagnostics = model.solver_diagnostics["model"]
    assert diagnostics is not None
    assert diagnostics.details["projection_distortion"] == estimate.distortion
    assert diagnostics.details["suggested_projection_dim"] == 57


@pytest.mark.parametrize("projection", ["kronecker", "gaussian"])
def test_a_projection_far_below_the_gradients_dimension_warns_once_with_a_larger_k(
    projection: str, caplog: pytest.LogCaptureFixture
) -> None:
    net = make_mlp(d_in=10, hidden=40, d_out=5)
    x, y = classification_data(64, d_in=10, n_classes=5)
    with caplog.at_level(logging.WARNING):
        model = ProjectedInfluence(net, F.cross_entropy, 4, projection, regularization=1e-3)
        model.fit(loader(x, y))
    estimate = model.projection_distortion["model"]
    assert estimate is not None
    assert estimate.distortion > DISTORTION_THRESHOLD
    assert model.factor_size <= 4 < estimate.suggested_dim <= model.n_parameters
    warnings = [r for r in caplog.records if "distorts influence" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert f"use projection_dim={estimate.suggested_dim}" in warnings[0].getMessage()
    assert "block 'model'" in warnings[0].getMessage()


def test_the_estimate_can_be_skipped() -> None:
    net = make_mlp()
    x, y = classification_data(20)
    model = ProjectedInfluence(net, F.cross_entropy, 8, regularization=0.1, distortion_samples=0)
    assert model.projection_distortion == {"model": None}
    model.fit(loader(x, y))
    assert model.projection_distortion == {"model": None}
    diagnostics = model.solver_diagnostics["model"]
    assert diagnostics is not None and "projection_distortion" not in diagnostics.details


def test_the_points_are_fewer_on_a_block_over_the_gradient_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = make_mlp()
    x, y = classification_data(40)
    monkeypatch.setattr(distortion, "DISTORTION_GRADIENT_NUMBERS", 57 * 10)
    model = ProjectedInfluence(net, F.cross_entropy, 8, regularization=0.1).fit(loader(x, y))
    estimate = model.projection_distortion["model"]
    assert estimate is not None and estimate.samples == 10
    monkeypatch.setattr(distortion, "DISTORTION_GRADIENT_NUMBERS", 57)
    estimate = model.fit(loader(x, y)).projection_distortion["model"]
    assert estimate is not None and estimate.samples == distortion.MIN_SAMPLES == 8


def test_the_estimate_is_not_saved(tmp_path: Path) -> None:
    net = make_mlp()
    x, y = classification_data(20)
    model = ProjectedInfluence(net, F.cross_entropy, 8, regularization=0.1).fit(loader(x, y))
    assert model.projection_distortion["model"] is not None
    path = model.save(tmp_path / "projected.fit")
    loaded = ProjectedInfluence(net, F.cross_entropy, 8, regularization=0.1).load_fit(path)
    assert loaded.projection_distortion == {"model": None}
    assert model.load_fit(path).projection_distortion == {"model": None}
