"""Solvers refuse to call an ill-conditioned system solved: the error names lambda and the
smallest safe lambda."""

from __future__ import annotations

import logging

import pytest
import torch.nn.functional as F

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.errors import IllConditionedError, NonConvergenceError
from influx.torch.curvature.operators import SecondOrderMode
from influx.torch.curvature.tensor_operator import MatrixOperator
from influx.torch.inverse.cg import CgOperator
from influx.torch.inverse.conditioning import max_condition_number, safe_regularization
from influx.torch.inverse.direct import DirectSolveOperator
from influx.torch.models import DirectInfluence
from references import exact_fisher, per_sample_grads

GN = SecondOrderMode.GAUSS_NEWTON


def _overparameterised() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    net = make_mlp(d_in=5, hidden=20, d_out=3).double()  # P = 183 > 20 points
    x, y = classification_data(20)
    return net, x.double(), y


def test_unregularised_gauss_newton_of_an_overparameterised_mlp_is_an_error() -> None:
    net, x, y = _overparameterised()
    model = DirectInfluence(net, F.cross_entropy, regularization=None, second_order_mode=GN)
    with pytest.raises(IllConditionedError) as info:
        model.fit(loader(x, y))
    message = str(info.value)
    assert "Block 'model': direct solve: C + λI with regularization=None" in message
    assert "more than torch.float64 resolves" in message
    assert "Use regularization >= " in message
    assert info.value.safe_regularization is not None and info.value.safe_regularization > 0
    # the safe value it names is accepted
    safe = DirectInfluence(
        net, F.cross_entropy, regularization=2 * info.value.safe_regularization,
        second_order_mode=GN,
    ).fit(loader(x, y))  # fmt: skip
    assert safe.solver_diagnostics["model"].converged


def test_the_same_model_with_auto_is_finite_and_exact() -> None:
    net, x, y = _overparameterised()
    model = DirectInfluence(net, F.cross_entropy, second_order_mode=GN).fit(loader(x, y))
    diagnostics = model.solver_diagnostics["model"]
    assert diagnostics.converged and diagnostics.condition_number < 1e6
    lam = diagnostics.regularization
    params = dict(net.named_parameters())
    fisher = exact_fisher(net, F.cross_entropy, params, x, y)
    assert lam == pytest.approx(float(torch.trace(fisher)) / fisher.shape[0])
    g = per_sample_grads(net, F.cross_entropy, params, x, y)
    expected = g[:4] @ torch.linalg.solve(fisher + lam * torch.eye(183, dtype=torch.float64), g.T)
    values = model.influences(x[:4], y[:4], x, y)
    assert torch.isfinite(values).all()
    assert rel_err(values, expected) < 1e-10


def test_warn_policy_logs_and_reports_not_converged(caplog: pytest.LogCaptureFixture) -> None:
    matrix = torch.diag(torch.tensor([1.0, 1e-15, 0.5], dtype=torch.float64))
    with caplog.at_level(logging.WARNING):
        op = DirectSolveOperator(matrix, None, on_nonconvergence="warn")
    assert "condition number 1e+15" in caplog.text
    assert op.diagnostics is not None and not op.diagnostics.converged
    assert op.diagnostics.condition_number == pytest.approx(1e15)
    fine = DirectSolveOperator(matrix, 1e-6)
    assert fine.diagnostics is not None and fine.diagnostics.converged
    assert fine.diagnostics.condition_number == pytest.approx(
        (1.0 + 1e-6) / (1e-6 + 1e-15), rel=1e-9
    )
    with pytest.raises(ValueError, match="'on_nonconvergence'"):
        DirectSolveOperator(matrix, None, on_nonconvergence="ignore")


def test_safe_regularization_makes_the_condition_number_the_limit() -> None:
    kappa = max_condition_number(torch.float32)
    assert kappa == pytest.approx(1 / (100 * torch.finfo(torch.float32).eps))
    safe = safe_regularization(-0.5, 10.0, None, torch.float32)
    assert (10.0 + safe) / (-0.5 + safe) == pytest.approx(kappa)


def _indefinite(p: int = 60) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    eigenvalues = torch.linspace(-0.074, 2.0, p, dtype=torch.float64)
    return (q * eigenvalues) @ q.T


def test_cg_on_an_indefinite_system_stops_and_names_the_lambda_that_fixes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    matrix = _indefinite()
    rhs = torch.randn(3, 60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    op = CgOperator(MatrixOperator(matrix), 0.01, on_nonconvergence="raise")
    with pytest.raises(IllConditionedError, match="is not positive definite") as info:
        op.apply(rhs)
    assert isinstance(info.value, NonConvergenceError)
    safe = info.value.safe_regularization
    # the estimate of the smallest eigenvalue is from the inside: -0.074 <= estimate < 0
    assert safe is not None and 0.0 < safe <= 0.074 + 1e-9
    assert f"Use regularization >= {safe:.3g}" in str(info.value)
    # it stopped at the first negative curvature, long before the default maxiter
    assert info.value.diagnostics.iterations < 60
    with caplog.at_level(logging.WARNING):
        warned = CgOperator(MatrixOperator(matrix), 0.01)
        warned.apply(rhs)
    assert "not positive definite" in caplog.text
    assert not warned.diagnostics.converged
    assert warned.diagnostics.condition_number == float("inf")


def test_cg_reports_its_condition_number_from_its_coefficients() -> None:
    eigenvalues = torch.linspace(0.5, 50.0, 40, dtype=torch.float64)
    q, _ = torch.linalg.qr(
        torch.randn(40, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    )
    matrix = (q * eigenvalues) @ q.T
    op = CgOperator(MatrixOperator(matrix), 0.5, rtol=1e-12, atol=1e-14)
    op.apply(torch.randn(2, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    assert op.diagnostics.converged
    # Ritz values converge to the extremes once CG has converged: kappa = 50.5 / 1.0
    assert op.diagnostics.condition_number == pytest.approx(50.5, rel=1e-3)


def test_cg_default_maxiter_is_capped() -> None:
    from influx.torch.inverse.conditioning import default_maxiter

    assert default_maxiter(10) == 100 and default_maxiter(6110) == 1000
