"""EnsembleInfluence: the weighted mean of its members' influences, in every entry point."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import torch
from helpers import classification_data, loader, make_mlp
from influx import InfluenceMode, SequentialInfluenceCalculator
from influx.torch import (
    CgInfluence,
    DirectInfluence,
    EnsembleInfluence,
    NestedTorchCatAggregator,
)

LOSS = torch.nn.functional.cross_entropy


def _fitted(seed: int, regularization: float = 0.1) -> DirectInfluence:
    x, y = classification_data(n=40, seed=1)
    net = make_mlp(seed=seed).double()
    return DirectInfluence(net, LOSS, regularization=regularization).fit(loader(x, y, 16))


@pytest.fixture(scope="module")
def data() -> tuple:
    x, y = classification_data(n=40, seed=1)
    x_test, y_test = classification_data(n=7, seed=2)
    return x, y, x_test, y_test


def test_an_ensemble_of_identical_members_equals_one_member(data: tuple) -> None:
    x, y, x_test, y_test = data
    member = _fitted(0)
    ensemble = EnsembleInfluence([member, _fitted(0), member])
    reference = member.influences(x_test, y_test, x, y)
    torch.testing.assert_close(
        ensemble.influences(x_test, y_test, x, y), reference, rtol=1e-12, atol=1e-14
    )
    factors = ensemble.influence_factors(x_test, y_test)
    assert factors.shape == (7, 3 * member.n_parameters)
    torch.testing.assert_close(
        ensemble.influences_from_factors(factors, x, y), reference, rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("mode", [InfluenceMode.Up, InfluenceMode.Perturbation])
def test_two_members_give_the_mean_and_weights_the_weighted_mean(
    data: tuple, mode: InfluenceMode
) -> None:
    x, y, x_test, y_test = data
    first, second = _fitted(0), _fitted(1, regularization=0.3)
    a = first.influences(x_test, y_test, x, y, mode)
    b = second.influences(x_test, y_test, x, y, mode)
    assert (a - b).abs().max() > 1e-3  # the members differ
    ensemble = EnsembleInfluence([first, second])
    torch.testing.assert_close(
        ensemble.influences(x_test, y_test, x, y, mode), (a + b) / 2, rtol=1e-12, atol=1e-14
    )
    weighted = EnsembleInfluence([first, second], weights=[3.0, 1.0])
    factors = weighted.influence_factors(x_test, y_test)
    torch.testing.assert_close(
        weighted.influences_from_factors(factors, x, y, mode),
        0.75 * a + 0.25 * b,
        rtol=1e-12,
        atol=1e-14,
    )
    torch.testing.assert_close(
        weighted.self_influences(x, y),
        0.75 * first.self_influences(x, y) + 0.25 * second.self_influences(x, y),
        rtol=1e-12,
        atol=1e-14,
    )


def test_the_sequential_calculator_maps_an_ensemble(data: tuple) -> None:
    x, y, x_test, y_test = data
    ensemble = EnsembleInfluence([_fitted(0), _fitted(2)])
    lazy = SequentialInfluenceCalculator(ensemble).influences(
        loader(x_test, y_test, 3), loader(x, y, 16)
    )
    values = lazy.compute(aggregator=NestedTorchCatAggregator())
    torch.testing.assert_close(
        values, ensemble.influences(x_test, y_test, x, y), rtol=1e-12, atol=1e-14
    )


def test_fit_fits_every_member_and_unfitted_members_raise(data: tuple) -> None:
    x, y, x_test, y_test = data
    members = [DirectInfluence(make_mlp(seed=s).double(), LOSS, regularization=0.1) for s in (0, 1)]
    ensemble = EnsembleInfluence(members)
    assert not ensemble.is_fitted
    with pytest.raises(Exception, match="fit"):
        ensemble.influences(x_test, y_test, x, y)
    assert ensemble.fit(loader(x, y, 16)) is ensemble and ensemble.is_fitted
    assert ensemble.dtype == torch.float64 and ensemble.is_thread_safe


def test_an_unconverged_member_is_named_in_a_warning(
    data: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    x, y, x_test, y_test = data
    unconverged = CgInfluence(make_mlp(seed=1).double(), LOSS, regularization=0.1, maxiter=1)
    unconverged.fit(loader(x, y, 16))
    ensemble = EnsembleInfluence([_fitted(0), unconverged])
    with caplog.at_level(logging.WARNING, logger="influx"):
        ensemble.influences(x_test, y_test, x, y)
    assert "Member 1 of the ensemble (CgInfluence)" in caplog.text
    assert "did not converge" in caplog.text


@pytest.mark.parametrize(
    "members, weights, error, message",
    [
        ([], None, ValueError, "Parameter 'members' must hold at least one influence model"),
        (
            ["model"],
            None,
            TypeError,
            "Parameter 'members' must hold influence models, member 0 is a str.",
        ),
        (
            None,
            [1.0],
            ValueError,
            "Parameter 'weights' must hold one weight per member (2), got 1.",
        ),
        (
            None,
            [1.0, -1.0],
            ValueError,
            "Parameter 'weights' must be finite, non-negative and not all zero, got [1.0, -1.0].",
        ),
        (None, [0.0, 0.0], ValueError, "Parameter 'weights' must be finite, non-negative"),
    ],
)
def test_bad_members_and_weights(members, weights, error, message) -> None:  # type: ignore[no-untyped-def]
    if members is None:
        members = [_fitted(0), _fitted(1)]
    with pytest.raises(error, match=re.escape(message)):
        EnsembleInfluence(members, weights)


def test_factors_of_another_width_are_refused(data: tuple) -> None:
    x, y, x_test, y_test = data
    member = _fitted(0)
    ensemble = EnsembleInfluence([member, member])
    width = 2 * member.n_parameters
    with pytest.raises(
        ValueError, match=re.escape(f"must be the ensemble's factors, of shape (N, {width})")
    ):
        ensemble.influences_from_factors(member.influence_factors(x_test, y_test), x, y)


def test_the_dask_calculator_maps_an_ensemble(data: tuple, dask_client: Any) -> None:
    import dask.array as da

    from influx import DaskInfluenceCalculator
    from influx.torch import TorchNumpyConverter

    x, y, x_test, y_test = data
    ensemble = EnsembleInfluence([_fitted(0), _fitted(2)], weights=[1.0, 2.0])
    calculator = DaskInfluenceCalculator(ensemble, TorchNumpyConverter(), dask_client)
    values = calculator.influences(
        da.from_array(x_test.numpy(), chunks=(4, -1)),
        da.from_array(y_test.numpy(), chunks=4),
        da.from_array(x.numpy(), chunks=(16, -1)),
        da.from_array(y.numpy(), chunks=16),
    )
    np.testing.assert_allclose(
        values.compute(), ensemble.influences(x_test, y_test, x, y).numpy(), rtol=1e-12, atol=1e-14
    )


def test_save_and_load_fit_restore_the_members(data: tuple, tmp_path: Path) -> None:
    x, y, x_test, y_test = data
    nets = [make_mlp(seed=s).double() for s in (0, 1)]
    ensemble = EnsembleInfluence(
        [DirectInfluence(net, LOSS, regularization=0.1) for net in nets], weights=[1.0, 3.0]
    ).fit(loader(x, y, 16))
    directory = ensemble.save(tmp_path / "ensemble")
    assert sorted(p.name for p in directory.iterdir()) == [
        "ensemble.json",
        "member-0.pt",
        "member-1.pt",
    ]
    restored = EnsembleInfluence(
        [DirectInfluence(net, LOSS, regularization=0.1) for net in nets], weights=[1.0, 3.0]
    ).load_fit(directory)
    torch.testing.assert_close(
        restored.influences(x_test, y_test, x, y),
        ensemble.influences(x_test, y_test, x, y),
        rtol=0,
        atol=0,
    )
    other = EnsembleInfluence([DirectInfluence(net, LOSS, regularization=0.1) for net in nets])
    with pytest.raises(ValueError, match=re.escape("was saved with weights [0.25, 0.75]")):
        other.load_fit(directory)
    with pytest.raises(ValueError, match=re.escape("holds an ensemble of ['DirectInfluence', ")):
        EnsembleInfluence([DirectInfluence(nets[0], LOSS, regularization=0.1)]).load_fit(directory)


def test_members_fitted_on_a_cluster_equal_members_fitted_here(
    data: tuple, dask_client: Any
) -> None:
    x, y, x_test, y_test = data

    def members() -> list:
        return [
            DirectInfluence(make_mlp(seed=s).double(), LOSS, regularization=0.1) for s in (0, 1)
        ]

    here = EnsembleInfluence(members()).fit(loader(x, y, 16))
    there = EnsembleInfluence(members()).fit(loader(x, y, 16), client=dask_client)
    assert there.is_fitted
    torch.testing.assert_close(
        there.influences(x_test, y_test, x, y),
        here.influences(x_test, y_test, x, y),
        rtol=1e-10,
        atol=1e-12,
    )
