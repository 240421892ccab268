"""EK-FAC as a preconditioner of conjugate gradient: same answers, fewer iterations."""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from typing import Iterator, Tuple

import cloudpickle
import pytest
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.torch import (
    BlockMode,
    CgInfluence,
    CgOperator,
    DirectInfluence,
    EkfacInfluence,
    EkfacPreconditioner,
    GaussNewtonOperator,
    MatrixOperator,
    SecondOrderMode,
)
from influx.torch import preconditioner as preconditioner_module
from influx.torch.inverse.preconditioner import check_preconditioner
from influx.torch.kfac.preconditioner import KroneckerBlockInverse, fit_kronecker_block_inverse

F = torch.nn.functional
GGN = SecondOrderMode.GENERALIZED_GAUSS_NEWTON


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kronecker_problem() -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor, DataLoader]:
    r"""A problem whose curvature is exactly Kronecker-factored, and ill-conditioned.

    One `Linear` layer without bias and one output, MSE, residuals $r_i = \pm 1/\sqrt 2$:
    with $\delta_i = 2 r_i$, the empirical Fisher $\frac1n\sum_i \delta_i^2 a_i a_i^\top
    = \frac2n\sum_i a_i a_i^\top$ equals the Hessian and the generalized Gauss-Newton matrix,
    and it is $G \otimes A$ with $G = 2$ exactly. The inputs have scales from 1 to 100 in a
    random basis, so plain CG needs many iterations.
    """
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 30
    scales = torch.logspace(0, 2, d)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    x = (torch.randn(n, d, generator=gen) * scales) @ basis.T
    torch.manual_seed(0)
    net = torch.nn.Linear(d, 1, bias=False)
    signs = torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1
    with torch.no_grad():
        y = net(x) - signs / math.sqrt(2)
    return net, x, y, loader(x, y, 64)


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    opt = torch.optim.LBFGS(net.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(net(x), y) + 1e-3 * sum((p**2).sum() for p in net.parameters())
        value.backward()
        return value

    opt.step(closure)
    return net


@pytest.fixture(scope="module")
def mlp() -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    x, y = classification_data(n=90)
    return train(make_mlp(), x, y), x, y


def cg(net, loss, lam, pre=None, mode=SecondOrderMode.HESSIAN, **kwargs) -> CgInfluence:
    return CgInfluence(
        net,
        loss,
        lam,
        rtol=1e-12,
        atol=0.0,
        preconditioner=pre,
        second_order_mode=mode,
        **kwargs,
    )


# --- exactness on a Kronecker-factored curvature --------------------------------------------


@pytest.mark.parametrize("mode", list(SecondOrderMode))
@pytest.mark.parametrize("update_diagonal", [True, False])
def test_exact_kronecker_curvature_converges_in_few_iterations(mode, update_diagonal) -> None:
    net, x, y, data = kronecker_problem()
    expected = (
        DirectInfluence(net, F.mse_loss, 1e-3, second_order_mode=mode)
        .fit(data)
        .influence_factors(x[:4], y[:4])
    )
    plain = cg(net, F.mse_loss, 1e-3, mode=mode).fit(data)
    pre = cg(net, F.mse_loss, 1e-3, EkfacPreconditioner(update_diagonal), mode=mode).fit(data)
    assert rel_err(plain.influence_factors(x[:4], y[:4]), expected) < 1e-8
    assert rel_err(pre.influence_factors(x[:4], y[:4]), expected) < 1e-8
    plain_iterations = plain.solver_diagnostics["model"].iterations
    pre_iterations = pre.solver_diagnostics["model"].iterations
    assert plain_iterations >= 30, plain_iterations
    assert pre_iterations <= 3, pre_iterations
    assert pre.solver_diagnostics["model"].details["preconditioner"] == "EkfacPreconditioner"


def test_matches_ekfac_influence_inverse(mlp) -> None:
    """The fitted P^{-1} is EkfacInfluence's inverse on the same layers.

    Agreement is to 1e-6, not to rounding: the cross-entropy's output-gradient factor has a
    zero eigenvalue (the logits' gradients sum to zero), which the preconditioner raises to
    1e-6 times the layer's mean eigenvalue.
    """
    net, x, y = mlp
    data = loader(x, y, 32)
    operator = GaussNewtonOperator(net, F.cross_entropy, data)
    pre = EkfacPreconditioner().fit(operator, 0.01)
    ekfac = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.01).fit(data)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def sample_loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x[:5], y[:5])
    flat = torch.cat([g[k].reshape(5, -1) for k in params], dim=1)
    assert rel_err(pre.solve(flat), ekfac.influence_factors(x[:5], y[:5])) < 1e-6
    assert rel_err(pre.solve(flat[0]), pre.solve(flat)[0]) < 1e-15
    inverse = pre.kronecker_inverse
    assert isinstance(inverse, KroneckerBlockInverse)
    assert inverse.layer_names == ["0", "2"] and inverse.rest.numel() == 0


# --- same answer as plain CG on a network -----------------------------------------------------


@pytest.mark.parametrize("mode", list(SecondOrderMode))
@pytest.mark.parametrize(
    "structure", [BlockMode.FULL, BlockMode.LAYER_WISE, BlockMode.PARAMETER_WISE]
)
def test_same_answer_as_plain_cg(mlp, mode, structure) -> None:
    net, x, y = mlp
    data = loader(x, y, 32)
    lam = 0.05
    plain = cg(net, F.cross_entropy, lam, mode=mode, block_structure=structure).fit(data)
    pre = cg(
        net, F.cross_entropy, lam, EkfacPreconditioner(), mode=mode, block_structure=structure
    ).fit(data)
    expected = plain.influences(x[:6], y[:6], x, y)
    assert rel_err(pre.influences(x[:6], y[:6], x, y), expected) < 1e-8
    for name, diagnostics in pre.solver_diagnostics.items():
        assert diagnostics is not None and diagnostics.converged, name


def test_fewer_iterations_on_the_gauss_newton_matrix(mlp) -> None:
    net, x, y = mlp
    data = loader(x, y, 32)
    iterations = {}
    for pre in (None, EkfacPreconditioner()):
        model = cg(net, F.cross_entropy, 1e-3, pre, mode=SecondOrderMode.GAUSS_NEWTON)
        model.fit(data).influence_factors(x[:4], y[:4])
        iterations[type(pre).__name__] = model.solver_diagnostics["model"].iterations
    assert iterations["EkfacPreconditioner"] < iterations["NoneType"], iterations


@pytest.mark.parametrize("fallback", ["jacobi", "identity"])
def test_other_layers_use_the_fallback(fallback: str, caplog) -> None:
    """A LayerNorm's parameters are preconditioned by the diagonal (or not at all)."""
    x, y = classification_data(n=50)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    )
    data = loader(x, y, 16)
    mode = SecondOrderMode.GAUSS_NEWTON
    expected = cg(net, F.cross_entropy, 0.05, mode=mode).fit(data).influences(x[:4], y[:4], x, y)
    pre = EkfacPreconditioner(fallback=fallback, num_samples_estimator=4, seed=1)
    model = cg(net, F.cross_entropy, 0.05, pre, mode=mode).fit(data)
    assert rel_err(model.influences(x[:4], y[:4], x, y), expected) < 1e-8
    fitted = model.block_mapper.composable_block_dict["model"].op.preconditioner
    inverse = fitted.kronecker_inverse
    assert inverse.layer_names == ["0", "3"]
    assert inverse.rest.tolist() == [24, 25, 26, 27, 28, 29, 30, 31]
    assert (inverse.diagonal is None) == (fallback == "identity")


def test_conv2d_layers() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 1, 5, 5, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(18, 3),
    )
    data = loader(x, y, 16)
    mode = SecondOrderMode.GAUSS_NEWTON
    expected = cg(net, F.cross_entropy, 0.05, mode=mode).fit(data).influences(x[:3], y[:3], x, y)
    model = cg(net, F.cross_entropy, 0.05, EkfacPreconditioner(), mode=mode).fit(data)
    assert rel_err(model.influences(x[:3], y[:3], x, y), expected) < 1e-8


def test_sampled_fisher_is_reproducible_with_a_seed(mlp) -> None:
    net, x, y = mlp
    data = loader(x, y, 32)
    operator = GaussNewtonOperator(net, F.cross_entropy, data)
    rhs = torch.randn(3, operator.input_size)
    a = EkfacPreconditioner(fisher="sampled", seed=3).fit(operator, 0.01).solve(rhs)
    b = EkfacPreconditioner(fisher="sampled", seed=3).fit(operator, 0.01).solve(rhs)
    c = EkfacPreconditioner().fit(operator, 0.01).solve(rhs)
    assert torch.equal(a, b)
    assert rel_err(a, c) > 1e-3
    model = cg(net, F.cross_entropy, 0.05, EkfacPreconditioner(fisher="sampled", seed=3), mode=GGN)
    expected = cg(net, F.cross_entropy, 0.05, mode=GGN).fit(data).influence_factors(x[:3], y[:3])
    assert rel_err(model.fit(data).influence_factors(x[:3], y[:3]), expected) < 1e-8


def test_with_regularization_reuses_the_fit(mlp) -> None:
    net, x, y = mlp
    data = loader(x, y, 32)
    model = cg(net, F.cross_entropy, 0.01, EkfacPreconditioner(), mode=GGN).fit(data)
    other = model.with_regularization(0.1)
    fresh = cg(net, F.cross_entropy, 0.1, EkfacPreconditioner(), mode=GGN).fit(data)
    assert (
        rel_err(other.influence_factors(x[:3], y[:3]), fresh.influence_factors(x[:3], y[:3]))
        < 1e-10
    )
    old_pre = model.block_mapper.composable_block_dict["model"].op.preconditioner
    new_pre = other.block_mapper.composable_block_dict["model"].op.preconditioner
    assert new_pre.regularization == 0.1 and old_pre.regularization == 0.01
    assert new_pre.kronecker_inverse is old_pre.kronecker_inverse


# --- operators without model and data ---------------------------------------------------------


def test_operator_without_model_falls_back_to_jacobi(caplog) -> None:
    gen = torch.Generator().manual_seed(4)
    diag = torch.logspace(0, 2, 20)  # above the floor of 1e-2 times the mean
    matrix = torch.diag(diag)
    rhs = torch.randn(3, 20, generator=gen)
    with caplog.at_level(logging.WARNING, logger="influx.torch.kfac.preconditioner"):
        op = CgOperator(MatrixOperator(matrix), 0.01, rtol=1e-12, atol=0.0,
                        preconditioner=EkfacPreconditioner(seed=0))  # fmt: skip
    assert "MatrixOperator carries no model" in caplog.text
    solution = op.apply(rhs)
    assert rel_err(solution, rhs / (diag + 0.01)) < 1e-12
    assert op.diagnostics is not None and op.diagnostics.iterations == 1


def test_precomputed_gauss_newton_falls_back(mlp, caplog) -> None:
    net, x, y = mlp
    data = loader(x, y, 32)
    mode = SecondOrderMode.GAUSS_NEWTON
    expected = cg(net, F.cross_entropy, 0.05, mode=mode).fit(data).influence_factors(x[:3], y[:3])
    with caplog.at_level(logging.WARNING, logger="influx.torch.kfac.preconditioner"):
        model = cg(net, F.cross_entropy, 0.05, EkfacPreconditioner(), mode=mode,
                   precompute_grad=True).fit(data)  # fmt: skip
    assert "carries no model, loss and data" in caplog.text
    assert rel_err(model.influence_factors(x[:3], y[:3]), expected) < 1e-8


# --- the preconditioner as an object ------------------------------------------------------------


def test_exported_and_accepted() -> None:
    assert preconditioner_module.EkfacPreconditioner is EkfacPreconditioner
    check_preconditioner(EkfacPreconditioner())
    model = CgInfluence(make_mlp(), F.cross_entropy, 0.1, preconditioner=EkfacPreconditioner())
    assert isinstance(model.preconditioner, EkfacPreconditioner)
    pre = EkfacPreconditioner()
    assert not pre.is_fitted and not pre.modify_regularization_requires_fit
    with pytest.raises(ValueError, match="EkfacPreconditioner is not fitted"):
        pre.solve(torch.ones(3))


def test_copies_and_pickles(mlp) -> None:
    net, x, y = mlp
    data = loader(x, y, 32)
    pre = EkfacPreconditioner(seed=0)
    assert isinstance(copy.deepcopy(pre), EkfacPreconditioner)
    assert not cloudpickle.loads(cloudpickle.dumps(pre)).is_fitted
    operator = GaussNewtonOperator(net, F.cross_entropy, data)
    pre.fit(operator, 0.01)
    rhs = torch.randn(2, operator.input_size)
    expected = pre.solve(rhs)
    for other in (copy.deepcopy(pre), cloudpickle.loads(cloudpickle.dumps(pre))):
        assert other.is_fitted and torch.equal(other.solve(rhs), expected)
    model = cg(net, F.cross_entropy, 0.05, EkfacPreconditioner(), mode=GGN).fit(data)
    factors = model.influence_factors(x[:2], y[:2])
    restored = cloudpickle.loads(cloudpickle.dumps(model))
    assert rel_err(restored.influence_factors(x[:2], y[:2]), factors) < 1e-12


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"fisher": "true"}, ValueError, r"'fisher' must be one of \['empirical', 'sampled'\]"),
        ({"fallback": "none"}, ValueError, r"'fallback' must be one of \['jacobi', 'identity'\]"),
        ({"num_samples_estimator": 0}, ValueError, "'num_samples_estimator' must be a positive"),
        ({"num_samples_estimator": 1.5}, TypeError, "'num_samples_estimator' must be a positive"),
        ({"seed": "1"}, TypeError, "'seed' must be an int or None, got str"),
        ({"max_cache_mb": -1}, ValueError, "'max_cache_mb' must be >= 0, got -1"),
        ({"max_cache_mb": None}, TypeError, "'max_cache_mb' must be a number, got NoneType"),
    ],
)
def test_bad_parameters(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        EkfacPreconditioner(**kwargs)


def test_float32_model(mlp) -> None:
    net, x, y = mlp
    net32 = copy.deepcopy(net).float()
    data32 = loader(x.float(), y, 32)
    expected = cg(net, F.cross_entropy, 0.05, mode=GGN).fit(loader(x, y, 32))
    model = CgInfluence(
        net32,
        F.cross_entropy,
        0.05,
        rtol=1e-6,
        preconditioner=EkfacPreconditioner(),
        second_order_mode=GGN,
    ).fit(data32)
    factors = model.influence_factors(x[:3].float(), y[:3])
    assert factors.dtype == torch.float32
    assert rel_err(factors.double(), expected.influence_factors(x[:3], y[:3])) < 1e-4


def test_fit_function_checks_its_options() -> None:
    operator = MatrixOperator(torch.eye(3))
    with pytest.raises(
        ValueError, match=r"'fallback' must be one of \['jacobi', 'identity'\], got 'x'"
    ):
        fit_kronecker_block_inverse(operator, fallback="x")


def test_sampled_fisher_needs_cross_entropy() -> None:
    net, x, y, data = kronecker_problem()
    with pytest.raises(ValueError, match="'fisher': 'sampled'.*cross-entropy"):
        cg(net, F.mse_loss, 0.1, EkfacPreconditioner(fisher="sampled")).fit(data)


def test_custom_block_with_weight_only(mlp) -> None:
    """A block holding a layer's weight but not its bias."""
    net, x, y = mlp
    data = loader(x, y, 32)
    structure = OrderedDict([("weights", ["0.weight", "2.weight"]), ("biases", ["0.bias"])])
    plain = cg(net, F.cross_entropy, 0.05, mode=GGN, block_structure=structure).fit(data)
    pre = cg(
        net, F.cross_entropy, 0.05, EkfacPreconditioner(), mode=GGN, block_structure=structure
    ).fit(data)
    expected = plain.influences(x[:3], y[:3], x, y)
    assert rel_err(pre.influences(x[:3], y[:3], x, y), expected) < 1e-8
