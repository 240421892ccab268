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
from influx.torch import ComposedInfluence, DirectSolver, ModeCurvature
from influx.torch.curvature.conditioning import max_condition_number
from influx.torch.curvature.operators import SecondOrderMode
from influx.torch.curvature.tensor_operator import MatrixOperator
from influx.torch.data.blocks import BlockMode
from influx.torch.inverse.cg import CgOperator
from influx.torch.models import (
    ArnoldiInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    ProjectedInfluence,
)
from references import exact_fisher, exact_hessian, per_sample_grads


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
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float, fisher: bool = False
) -> torch.Tensor:
    params = dict(net.named_parameters())
    curvature = exact_fisher if fisher else exact_hessian
    hessian = curvature(net, F.mse_loss, params, x, y)
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


def test_lissa_reports_the_condition_number_of_its_first_batches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, x, y = _singular_regression()
    # a loose rtol: the iteration "converges" quickly, the system is singular all the same
    with pytest.raises(IllConditionedError, match="LiSSA: C \\+ λI with regularization=0.0"):
        LissaInfluence(net, F.mse_loss, 0.0, rtol=0.5, scale=10.0, on_nonconvergence="raise").fit(
            loader(x, y)
        ).influence_factors(x[:3], y[:3])
    with caplog.at_level(logging.WARNING):
        model = LissaInfluence(net, F.mse_loss, 0.0, rtol=0.5, scale=10.0).fit(loader(x, y))
        model.influence_factors(x[:3], y[:3])
    assert "Use regularization >= " in caplog.text
    diagnostics = model.solver_diagnostics["model"]
    assert not diagnostics.converged and diagnostics.residual < 0.5
    # well conditioned (full batches: deterministic): converged, the numbers of the direct solve
    fine = LissaInfluence(
        net, F.mse_loss, 0.5, rtol=1e-13, scale=10.0, on_nonconvergence="raise"
    ).fit(loader(x, y, 24))
    values = fine.influences(x[:3], y[:3], x, y)
    diagnostics = fine.solver_diagnostics["model"]
    assert diagnostics.converged and diagnostics.condition_number < 100
    smallest, largest = diagnostics.details["spectrum_estimate"]
    hessian = exact_hessian(net, F.mse_loss, dict(net.named_parameters()), x, y)
    exact = torch.linalg.eigvalsh(hessian)
    assert smallest == pytest.approx(float(exact[0]), abs=1e-10)
    assert largest == pytest.approx(float(exact[-1]), rel=1e-10)
    assert rel_err(values, _direct_reference(net, x, y, 0.5)) < 1e-8


def test_inverse_harmonic_mean_checks_its_worst_rank_one_term(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, x, y = _singular_regression()
    gauss_newton = SecondOrderMode.GAUSS_NEWTON
    with caplog.at_level(logging.WARNING):
        model = InverseHarmonicMeanInfluence(net, F.mse_loss, 1e-20).fit(loader(x, y))
    assert "Block 'model': inverse harmonic mean: C + λI with regularization=1e-20" in (caplog.text)
    assert not model.solver_diagnostics["model"].converged
    with pytest.raises(IllConditionedError) as info:
        InverseHarmonicMeanInfluence(
            net, F.mse_loss, 1e-20, second_order_mode=gauss_newton, on_nonconvergence="raise"
        ).fit(loader(x, y))
    g = per_sample_grads(net, F.mse_loss, dict(net.named_parameters()), x, y)
    largest = float((g * g).sum(dim=1).max())
    # kappa = 1 + max |g|^2 / lambda <= 1 / (100 eps) from lambda_safe on
    assert info.value.safe_regularization == pytest.approx(
        largest / (max_condition_number(torch.float64) - 1), rel=1e-9
    )
    fine = InverseHarmonicMeanInfluence(net, F.mse_loss, 1.0, on_nonconvergence="raise").fit(
        loader(x, y)
    )
    diagnostics = fine.solver_diagnostics["model"]
    assert diagnostics.converged
    assert diagnostics.condition_number == pytest.approx(1 + largest, rel=1e-12)
    eye = torch.eye(4, dtype=torch.float64)
    mean_inverse = torch.stack([torch.linalg.inv(torch.outer(gi, gi) + eye) for gi in g]).mean(0)
    expected = g[:3] @ mean_inverse @ g.T
    assert rel_err(fine.influences(x[:3], y[:3], x, y), expected) < 1e-10


def test_block_cg_estimates_the_spectrum_from_its_gram_matrices(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    matrix = (q * torch.tensor([2.0, 1.0, 0.5, 1e-16], dtype=torch.float64)) @ q.T
    rhs = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    op = CgOperator(MatrixOperator(matrix), None, use_block_cg=True, on_nonconvergence="raise")
    with pytest.raises(IllConditionedError, match="block CG: C \\+ λI with regularization=None"):
        op.apply(rhs)
    fine = CgOperator(MatrixOperator(matrix), 0.1, use_block_cg=True, rtol=1e-12, atol=0.0)
    solution = fine.apply(rhs)
    assert fine.diagnostics.converged
    # Ritz values: from the inside of [0.1, 2.1]
    assert 1.0 < fine.diagnostics.condition_number <= 21.0 * (1 + 1e-9)
    expected = torch.linalg.solve(matrix + 0.1 * torch.eye(4, dtype=torch.float64), rhs.T).T
    assert rel_err(solution, expected) < 1e-10


def test_projected_influence_checks_its_k_by_k_system() -> None:
    net, x, y = _singular_regression()
    with pytest.raises(IllConditionedError, match="Block 'model': direct solve"):
        ProjectedInfluence(net, F.mse_loss, projection_dim=4, regularization=0.0).fit(loader(x, y))
    fine = ProjectedInfluence(net, F.mse_loss, projection_dim=4, regularization=0.1)
    fine.fit(loader(x, y))
    assert fine.solver_diagnostics["model"].converged
    # k = P with an orthogonal projection: the direct solve's numbers
    expected = _direct_reference(net, x, y, 0.1, fisher=True)
    assert rel_err(fine.influences(x[:3], y[:3], x, y), expected) < 1e-9


def test_composed_influence_reports_each_block(caplog: pytest.LogCaptureFixture) -> None:
    net, x, y = _singular_regression()
    net = torch.nn.Sequential(net, torch.nn.Linear(1, 1).double())  # a second, regular block
    curvature = ModeCurvature(SecondOrderMode.HESSIAN)
    with caplog.at_level(logging.WARNING):
        model = ComposedInfluence(
            net, F.mse_loss, curvature, DirectSolver(on_nonconvergence="warn"), 0.0,
            block_structure=BlockMode.LAYER_WISE,
        ).fit(loader(x, y))  # fmt: skip
    assert "Block '0': direct solve" in caplog.text and "Block '1'" not in caplog.text
    diagnostics = model.solver_diagnostics
    assert not diagnostics["0"].converged and diagnostics["1"].converged
