"""Every influence model checks the conditioning of what it inverts: a singular curvature at
lambda = 0 (or a tiny lambda) in float64 is never reported converged in silence, and a
well-conditioned one keeps its numbers."""

from __future__ import annotations

import logging

import pytest
import torch.nn.functional as F

import torch
from helpers import loader, rel_err
from influx.errors import IllConditionedError
from influx.torch.curvature.conditioning import max_condition_number
from influx.torch.models import (
    ArnoldiInfluence,
    DirectInfluence,
    EkfacInfluence,
    NystroemSketchInfluence,
)
from references import exact_hessian, per_sample_grads


def _singular_regression() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A bias-free linear regression whose last two input columns are equal: its Hessian
    2/n X^T X (P = 4) has one zero eigenvalue."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1, bias=False).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    x[:, 3] = x[:, 2]
    y = torch.randn(24, 1, generator=gen, dtype=torch.float64)
    return net, x, y


def _direct_reference(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float
) -> torch.Tensor:
    params = dict(net.named_parameters())
    hessian = exact_hessian(net, F.mse_loss, params, x, y)
    g = per_sample_grads(net, F.mse_loss, params, x, y)
    return g[:3] @ torch.linalg.solve(hessian + lam * torch.eye(4, dtype=torch.float64), g.T)


def test_direct_influence_takes_the_policy_as_an_argument(caplog: pytest.LogCaptureFixture) -> None:
    net, x, y = _singular_regression()
    with pytest.raises(IllConditionedError, match="regularization=0.0"):
        DirectInfluence(net, F.mse_loss, 0.0).fit(loader(x, y))
    with caplog.at_level(logging.WARNING):
        model = DirectInfluence(net, F.mse_loss, 0.0, on_nonconvergence="warn").fit(loader(x, y))
    assert "direct solve: C + λI with regularization=0.0 has condition number" in caplog.text
    diagnostics = model.solver_diagnostics["model"]
    assert not diagnostics.converged
    assert diagnostics.condition_number > max_condition_number(torch.float64)
    assert model.settings["on_nonconvergence"] == "warn"
    with pytest.raises(ValueError, match="Parameter 'on_nonconvergence' must be one of"):
        DirectInfluence(net, F.mse_loss, 0.1, on_nonconvergence="ignore")


@pytest.mark.parametrize("use_woodbury", [False, True])
def test_arnoldi_keeping_a_zero_eigenvalue_is_not_converged(
    use_woodbury: bool, caplog: pytest.LogCaptureFixture
) -> None:
    net, x, y = _singular_regression()
    lam = 1e-15 if use_woodbury else 0.0
    with pytest.raises(IllConditionedError, match="Block 'model': lanczos inverse") as info:
        ArnoldiInfluence(
            net, F.mse_loss, lam, rank=4, use_woodbury=use_woodbury, on_nonconvergence="raise"
        ).fit(loader(x, y))
    assert info.value.safe_regularization is not None and info.value.safe_regularization > 0
    with caplog.at_level(logging.WARNING):
        model = ArnoldiInfluence(net, F.mse_loss, lam, rank=4, use_woodbury=use_woodbury)
        model.fit(loader(x, y))
    assert "Use regularization >= " in caplog.text
    assert not model.solver_diagnostics["model"].converged
    # well conditioned: converged, and the numbers of the direct solve
    fine = ArnoldiInfluence(
        net, F.mse_loss, 0.1, rank=4, use_woodbury=use_woodbury, on_nonconvergence="raise"
    ).fit(loader(x, y))
    diagnostics = fine.solver_diagnostics["model"]
    assert diagnostics.converged and diagnostics.condition_number < 1e3
    values = fine.influences(x[:3], y[:3], x, y)
    assert rel_err(values, _direct_reference(net, x, y, 0.1)) < 1e-9


def test_nystroem_with_a_tiny_lambda_warns_or_raises(caplog: pytest.LogCaptureFixture) -> None:
    net, x, y = _singular_regression()
    with caplog.at_level(logging.WARNING):
        model = NystroemSketchInfluence(net, F.mse_loss, 1e-15, rank=4, seed=0)
        model.fit(loader(x, y))
    assert "nystroem inverse" in caplog.text.lower() and "Use regularization >= " in caplog.text
    assert not model.solver_diagnostics["model"].converged
    with pytest.raises(IllConditionedError, match="Block 'model'"):
        NystroemSketchInfluence(
            net, F.mse_loss, 1e-15, rank=4, seed=0, on_nonconvergence="raise"
        ).fit(loader(x, y))
    fine = NystroemSketchInfluence(
        net, F.mse_loss, 0.1, rank=4, seed=0, on_nonconvergence="raise"
    ).fit(loader(x, y))
    assert fine.solver_diagnostics["model"].converged
    values = fine.influences(x[:3], y[:3], x, y)
    assert rel_err(values, _direct_reference(net, x, y, 0.1)) < 1e-9


def test_ekfac_with_a_tiny_lambda_names_the_layer_and_a_safe_lambda(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, x, y = _singular_regression()
    with caplog.at_level(logging.WARNING):
        model = EkfacInfluence(net, loss=F.mse_loss, hessian_regularization=1e-14)
        model.fit(loader(x, y))
    assert "Layer 'model': kfac: C + λI with regularization=1e-14 has condition number" in (
        caplog.text
    )
    assert not model.solver_diagnostics["model"].converged
    with pytest.raises(IllConditionedError, match="Layer 'model'") as info:
        EkfacInfluence(
            net, loss=F.mse_loss, hessian_regularization=1e-14, on_nonconvergence="raise"
        ).fit(loader(x, y))
    safe = info.value.safe_regularization
    assert safe is not None
    fine = EkfacInfluence(
        net, loss=F.mse_loss, hessian_regularization=2 * safe, on_nonconvergence="raise"
    ).fit(loader(x, y))
    assert fine.solver_diagnostics["model"].converged
    # well conditioned: the numbers of the factored inverse, formed densely
    lam = 0.1
    model = EkfacInfluence(net, loss=F.mse_loss, hessian_regularization=lam).fit(loader(x, y))
    assert model.solver_diagnostics["model"].converged
    basis = model.eigenbases["model"]
    q = torch.kron(basis.output_eigenvectors, basis.input_eigenvectors)
    s = model.eigenvalues["model"].reshape(-1)
    g = per_sample_grads(net, F.mse_loss, dict(net.named_parameters()), x, y)
    expected = g[:3] @ q @ torch.diag(1 / (s + lam)) @ q.T @ g.T
    assert rel_err(model.influences(x[:3], y[:3], x, y), expected) < 1e-10


def test_none_means_no_regularization_in_every_model() -> None:
    net, x, y = _singular_regression()
    for model in (
        EkfacInfluence(net, loss=F.mse_loss, regularization=None),
        EkfacInfluence(net, loss=F.mse_loss, hessian_regularization=None),
        DirectInfluence(net, F.mse_loss, None),
    ):
        assert model.regularization_by_block == {"model": None}
    assert EkfacInfluence(net, loss=F.mse_loss).regularization_by_block == {"model": None}
    assert EkfacInfluence(net, loss=F.mse_loss)._regularization_by_block == {"model": "auto"}
    with pytest.raises(ValueError, match="are aliases"):
        EkfacInfluence(net, loss=F.mse_loss, hessian_regularization=0.1, regularization=None)
    # no damping: the conditioning check applies
    with pytest.raises(IllConditionedError, match="regularization=None"):
        EkfacInfluence(net, loss=F.mse_loss, regularization=None, on_nonconvergence="raise").fit(
            loader(x, y)
        )
