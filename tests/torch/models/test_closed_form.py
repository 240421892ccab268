"""Linear regression with MSE: every quantity against its closed form, to 1e-10 in float64."""

from __future__ import annotations

import pytest

import torch
from helpers import LinearRegression, loader, rel_err
from influx import InfluenceMode
from influx.torch import (
    DirectInfluence,
    GaussNewtonOperator,
    HessianOperator,
    SecondOrderMode,
    TorchBatch,
    TorchGradientProvider,
)
from influx.torch.functional import operator_to_dense

TOL = 1e-10


def test_grads_match_closed_form(linreg: LinearRegression) -> None:
    gp = TorchGradientProvider(linreg.model, linreg.loss)
    batch = TorchBatch(linreg.x, linreg.y)
    expected = linreg.grads(linreg.x, linreg.y)
    assert rel_err(gp.flat_grads(batch), expected) < TOL
    grads = gp.grads(batch)
    assert list(grads) == ["weight", "bias"]
    assert grads["weight"].shape == (40, 3, 4)
    assert rel_err(grads["bias"], expected[:, 12:]) < TOL


def test_mixed_grads_match_closed_form(linreg: LinearRegression) -> None:
    gp = TorchGradientProvider(linreg.model, linreg.loss)
    batch = TorchBatch(linreg.x, linreg.y)
    expected = linreg.mixed_grads(linreg.x, linreg.y)
    assert gp.flat_mixed_grads(batch).shape == (40, 4, 15)
    assert rel_err(gp.flat_mixed_grads(batch), expected) < TOL
    assert gp.mixed_grads(batch)["weight"].shape == (40, 4, 12)


def test_jacobian_prod_matches_closed_form(linreg: LinearRegression) -> None:
    gp = TorchGradientProvider(linreg.model, linreg.loss)
    g = torch.randn(5, linreg.n_params)
    expected = linreg.grads(linreg.x, linreg.y) @ g.T
    assert rel_err(gp.jacobian_prod(TorchBatch(linreg.x, linreg.y), g), expected) < TOL


def test_restrict_to_selects_parameters(linreg: LinearRegression) -> None:
    gp = TorchGradientProvider(linreg.model, linreg.loss, {"bias": linreg.model.bias})
    expected = linreg.grads(linreg.x, linreg.y)[:, 12:]
    assert rel_err(gp.flat_grads(TorchBatch(linreg.x, linreg.y)), expected) < TOL


@pytest.mark.parametrize("batch_size", [7, 40, 16])
def test_curvature_operators_match_closed_form(linreg: LinearRegression, batch_size: int) -> None:
    data = loader(linreg.x, linreg.y, batch_size)
    h = HessianOperator(linreg.model, linreg.loss, data)
    assert rel_err(h.to_dense(), linreg.hessian()) < TOL
    dense = operator_to_dense(h.apply, h.input_size, h.dtype, h.device)
    assert rel_err(dense, linreg.hessian()) < TOL
    v = torch.randn(3, linreg.n_params)
    assert rel_err(h.apply(v), v @ linreg.hessian()) < TOL
    gn = GaussNewtonOperator(linreg.model, linreg.loss, data)
    assert rel_err(gn.to_dense(), linreg.gauss_newton()) < TOL
    assert rel_err(gn.apply(v), v @ linreg.gauss_newton()) < TOL


@pytest.mark.parametrize("mode", list(SecondOrderMode))
def test_direct_influences_match_closed_form(
    linreg: LinearRegression, mode: SecondOrderMode
) -> None:
    lam = 0.05
    # A linear model: its generalized Gauss-Newton matrix is its Hessian.
    curvature = linreg.gauss_newton() if mode is SecondOrderMode.GAUSS_NEWTON else linreg.hessian()
    inverse = torch.linalg.inv(curvature + lam * torch.eye(linreg.n_params))
    g_test = linreg.grads(linreg.x_test, linreg.y_test)
    g_train = linreg.grads(linreg.x, linreg.y)
    model = DirectInfluence(linreg.model, linreg.loss, lam, second_order_mode=mode)
    model.fit(loader(linreg.x, linreg.y, 9))

    up = model.influences(linreg.x_test, linreg.y_test, linreg.x, linreg.y)
    assert up.shape == (7, 40)
    assert rel_err(up, g_test @ inverse @ g_train.T) < TOL

    pert = model.influences(
        linreg.x_test, linreg.y_test, linreg.x, linreg.y, mode=InfluenceMode.Perturbation
    )
    expected = torch.einsum("ip,jfp->ijf", g_test @ inverse, linreg.mixed_grads(linreg.x, linreg.y))
    assert pert.shape == (7, 40, 4)
    assert rel_err(pert, expected) < TOL

    factors = model.influence_factors(linreg.x_test, linreg.y_test)
    assert rel_err(factors, g_test @ inverse) < TOL
    assert rel_err(model.influences_from_factors(factors, linreg.x, linreg.y), up) < TOL
    from_factors_pert = model.influences_from_factors(
        factors, linreg.x, linreg.y, mode=InfluenceMode.Perturbation
    )
    assert rel_err(from_factors_pert, pert) < TOL


def test_perturbation_keeps_input_shape() -> None:
    """Perturbation influences have the shape (n_test, n_train, *x.shape[1:])."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
    x = torch.randn(10, 2, 3)
    y = torch.randint(0, 2, (10,))
    model = DirectInfluence(net, torch.nn.functional.cross_entropy, 0.1).fit(loader(x, y, 4))
    pert = model.influences(x[:3], y[:3], x, y, mode=InfluenceMode.Perturbation)
    assert pert.shape == (3, 10, 2, 3)


def test_test_by_test_is_symmetric(linreg: LinearRegression) -> None:
    model = DirectInfluence(linreg.model, linreg.loss, 0.1).fit(loader(linreg.x, linreg.y))
    values = model.influences(linreg.x_test, linreg.y_test)
    assert values.shape == (7, 7)
    assert torch.allclose(values, values.T, rtol=1e-12, atol=1e-14)
    explicit = model.influences(linreg.x_test, linreg.y_test, linreg.x_test, linreg.y_test)
    assert rel_err(values, explicit) < TOL
