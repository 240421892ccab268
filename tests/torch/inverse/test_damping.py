"""regularization="auto": lambda = 0.1 tr(C) / P per block, reported in the diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.torch.curvature.operators import SecondOrderMode
from influx.torch.curvature.tensor_operator import MatrixOperator
from influx.torch.data.blocks import BlockMode
from influx.torch.inverse.damping import AUTO_DAMPING_FACTOR, auto_regularization, curvature_scale
from influx.torch.models import CgInfluence, DirectInfluence, EkfacInfluence
from references import exact_hessian


def _setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    net = make_mlp().double()
    x, y = classification_data(40)
    return net, x.double(), y


def test_auto_is_the_mean_eigenvalue_of_the_exact_hessian() -> None:
    net, x, y = _setup()
    model = DirectInfluence(net, F.cross_entropy).fit(loader(x, y))
    params = dict(net.named_parameters())
    h = exact_hessian(net, F.cross_entropy, params, x, y)
    assert AUTO_DAMPING_FACTOR == 1.0
    expected = float(torch.trace(h)) / h.shape[0]
    assert model.regularization == "auto"
    lam = model.regularization_by_block["model"]
    assert lam == pytest.approx(expected, rel=1e-10)
    diagnostics = model.solver_diagnostics["model"]
    assert diagnostics is not None and diagnostics.regularization == pytest.approx(expected)
    # the same as giving the number explicitly
    explicit = DirectInfluence(net, F.cross_entropy, regularization=lam).fit(loader(x, y))
    assert (
        rel_err(model.influences(x[:4], y[:4], x, y), explicit.influences(x[:4], y[:4], x, y))
        < 1e-12
    )


def test_auto_of_an_indefinite_matrix_uses_a_tenth_of_the_rms_eigenvalue() -> None:
    matrix = torch.diag(torch.tensor([-3.0, 1.0, 1.0], dtype=torch.float64))
    assert curvature_scale(MatrixOperator(matrix)) == pytest.approx(0.1 * (11 / 3) ** 0.5)
    assert auto_regularization(MatrixOperator(matrix)) == pytest.approx(0.1 * (11 / 3) ** 0.5)
    psd = torch.diag(torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64))
    assert auto_regularization(MatrixOperator(psd)) == pytest.approx(2.0)


def test_auto_for_kfac_is_a_tenth_of_the_mean_kronecker_eigenvalue() -> None:
    net, x, y = _setup()
    model = EkfacInfluence(net).fit(loader(x, y))
    for name, s in model.eigenvalues.items():
        lam = 0.1 * float(s.mean())
        assert model.regularization_by_block[name] == pytest.approx(lam)
        diagnostics = model.solver_diagnostics[name]
        assert diagnostics is not None and diagnostics.regularization == pytest.approx(lam)
        shifted = s + lam
        assert diagnostics.converged
        assert diagnostics.condition_number == pytest.approx(float(shifted.max() / shifted.min()))
    unregularized = model.with_regularization(None)
    assert any(not d.converged for d in unregularized.solver_diagnostics.values())


def test_auto_for_cg_estimates_the_trace_reproducibly() -> None:
    net, x, y = _setup()
    gn = SecondOrderMode.GAUSS_NEWTON
    first = CgInfluence(net, F.cross_entropy, second_order_mode=gn).fit(loader(x, y))
    second = CgInfluence(net, F.cross_entropy, second_order_mode=gn).fit(loader(x, y))
    exact = DirectInfluence(net, F.cross_entropy, second_order_mode=gn).fit(loader(x, y))
    lam = first.regularization_by_block["model"]
    assert lam == second.regularization_by_block["model"]
    # Hutchinson with 8 probes: within a factor 2 of the exact trace here
    assert 0.5 < lam / exact.regularization_by_block["model"] < 2.0
    first.influences(x[:2], y[:2], x[:5], y[:5])
    assert first.solver_diagnostics["model"].regularization == lam


def test_a_dict_must_name_every_block() -> None:
    with pytest.raises(ValueError, match=r"must name every block, got no value for \['2'\]"):
        DirectInfluence(make_mlp(), F.cross_entropy, {"0": 0.1}, BlockMode.LAYER_WISE)
    model = DirectInfluence(
        make_mlp(), F.cross_entropy, {"0": 0.1, "2": "auto"}, BlockMode.LAYER_WISE
    )
    assert model.regularization_by_block == {"0": 0.1, "2": None}


def test_numpy_scalars_and_0d_tensors_are_numbers() -> None:
    net, x, y = _setup()
    reference = DirectInfluence(net, F.cross_entropy, 0.25).fit(loader(x, y))
    expected = reference.influences(x[:3], y[:3], x, y)
    for value in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), np.array(0.25)):
        model = DirectInfluence(net, F.cross_entropy, value).fit(loader(x, y))  # type: ignore[arg-type]
        assert model.regularization_by_block["model"] == 0.25
        assert rel_err(model.influences(x[:3], y[:3], x, y), expected) < 1e-12
    with pytest.raises(TypeError, match="'regularization' must be .* got Tensor"):
        DirectInfluence(net, F.cross_entropy, torch.ones(2))  # type: ignore[arg-type]


def test_with_regularization_auto() -> None:
    net, x, y = _setup()
    model = DirectInfluence(net, F.cross_entropy).fit(loader(x, y))
    lam = model.regularization_by_block["model"]
    back = model.with_regularization(0.5).with_regularization("auto")
    assert back.regularization_by_block["model"] == pytest.approx(lam)
    fixed = DirectInfluence(net, F.cross_entropy, 0.5).fit(loader(x, y))
    with pytest.raises(ValueError, match="'regularization': \"auto\" for block 'model' needs"):
        fixed.with_regularization("auto")
