"""Iterative inverse solvers: CG, block CG, preconditioners and LiSSA against exact solves."""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Iterator, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import torch
from helpers import LinearRegression, loader, make_mlp, rel_err
from influx.torch import (
    BlockMode,
    CgInfluence,
    CgOperator,
    DirectInfluence,
    HessianBatchOperation,
    JacobiPreconditioner,
    LissaInfluence,
    LissaOperator,
    MatrixOperator,
    NystroemPreconditioner,
    SecondOrderMode,
)
from influx.torch.inverse.cg import block_conjugate_gradient, conjugate_gradient
from influx.torch.inverse.lissa import lissa

F = torch.nn.functional
N_TRAIN = 120


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    # The problems here are tiny: thread start-up costs more than it saves.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    return train_mlp()


def train_mlp() -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP (57 parameters) trained to a minimum of noisy, non-separable 3-class data.

    Its Hessian has eigenvalues from about 0 to 0.8, so lambda in [1e-3, 1e-1] matters.
    """
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, 5, generator=gen)
    teacher = torch.randn(5, 3, generator=gen)
    y = (x @ teacher + 2.0 * torch.randn(N_TRAIN, 3, generator=gen)).argmax(dim=1)
    net = make_mlp()
    opt = torch.optim.LBFGS(
        net.parameters(),
        max_iter=150,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(net(x), y)
        value.backward()
        return value

    opt.step(closure)
    for p in net.parameters():
        p.grad = None
    return net, x, y


def direct(net, x, y, lam, batch_size=N_TRAIN, **kwargs):
    return DirectInfluence(net, F.cross_entropy, lam, **kwargs).fit(loader(x, y, batch_size))


def ill_conditioned_matrix(size: int = 60) -> torch.Tensor:
    """SPD matrix with a diagonal from 1 to 1e4 and a small dense perturbation."""
    gen = torch.Generator().manual_seed(3)
    noise = 0.5 * torch.randn(size, size, generator=gen)
    return torch.diag(torch.logspace(0, 4, size)) + noise @ noise.T / size


# --- pure solvers and CgOperator on explicit matrices ------------------------------------


@pytest.mark.parametrize("use_block_cg", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cg_operator_equals_linalg_solve(seed: int, use_block_cg: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    size = 30
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=gen))
    matrix = (q * torch.logspace(-2, 2, size)) @ q.T
    rhs = torch.randn(6, size, generator=gen)
    op = CgOperator(MatrixOperator(matrix), 0.05, rtol=1e-12, atol=0.0, use_block_cg=use_block_cg)
    expected = torch.linalg.solve(matrix + 0.05 * torch.eye(size), rhs.T).T
    assert rel_err(op.apply(rhs), expected) < 1e-10
    assert rel_err(op.apply(rhs[0]), expected[0]) < 1e-10  # a single vector


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(1, 12),
    n_rhs=st.integers(1, 20),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    use_block_cg=st.booleans(),
)
def test_cg_random_spd_property(
    size: int, n_rhs: int, lam: float, seed: int, use_block_cg: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, dtype=torch.float64, generator=gen)
    matrix = a @ a.T + 0.1 * torch.eye(size, dtype=torch.float64)
    rhs = torch.randn(n_rhs, size, dtype=torch.float64, generator=gen)
    op = CgOperator(MatrixOperator(matrix), lam, rtol=1e-12, atol=0.0, use_block_cg=use_block_cg)
    expected = torch.linalg.solve(matrix + lam * torch.eye(size, dtype=torch.float64), rhs.T).T
    assert rel_err(op.apply(rhs), expected) < 1e-8
    assert op.diagnostics is not None and op.diagnostics.converged


def test_block_cg_more_rhs_than_parameters() -> None:
    matrix = ill_conditioned_matrix(20)
    rhs = torch.randn(50, 20)
    rhs[10] = 0.0  # a zero right-hand side
    rhs[11] = rhs[12] + rhs[13]  # a dependent one
    result = block_conjugate_gradient(lambda v: v @ matrix, rhs, rtol=1e-12, atol=0.0)
    assert result.all_converged
    assert result.max_iterations <= 3
    assert rel_err(result.solution, torch.linalg.solve(matrix, rhs.T).T) < 1e-10
    assert float(result.solution[10].abs().max()) == 0.0


def test_cg_zero_rhs_takes_no_iteration() -> None:
    result = conjugate_gradient(lambda v: 2 * v, torch.zeros(3, 4))
    assert result.all_converged and result.max_iterations == 0
    assert float(result.solution.abs().max()) == 0.0


@pytest.mark.parametrize("use_block_cg", [False, True])
def test_float32(use_block_cg: bool) -> None:
    matrix = ill_conditioned_matrix(20).to(torch.float32)
    rhs = torch.randn(4, 20, dtype=torch.float32)
    op = CgOperator(MatrixOperator(matrix), 0.1, rtol=1e-5, atol=0.0, use_block_cg=use_block_cg)
    x = op.apply(rhs)
    assert x.dtype == torch.float32
    expected = torch.linalg.solve(matrix.double() + 0.1 * torch.eye(20), rhs.double().T).T
    assert rel_err(x.double(), expected) < 1e-4


@pytest.mark.parametrize("use_block_cg", [False, True])
@pytest.mark.parametrize(
    "preconditioner",
    [JacobiPreconditioner(), NystroemPreconditioner(rank=30)],
    ids=["jacobi", "nystroem"],
)
def test_preconditioner_reduces_iterations(preconditioner, use_block_cg: bool) -> None:
    matrix = ill_conditioned_matrix()
    rhs = torch.randn(5, matrix.shape[0])
    expected = torch.linalg.solve(matrix + 1e-3 * torch.eye(matrix.shape[0]), rhs.T).T
    iterations = {}
    for name, pre in (("plain", None), ("preconditioned", preconditioner)):
        op = CgOperator(
            MatrixOperator(matrix),
            1e-3,
            rtol=1e-10,
            atol=0.0,
            preconditioner=pre,
            use_block_cg=use_block_cg,
        )
        assert rel_err(op.apply(rhs), expected) < 1e-8
        assert op.diagnostics is not None and op.diagnostics.converged
        iterations[name] = op.diagnostics.iterations
    assert iterations["preconditioned"] < iterations["plain"], iterations
    assert not preconditioner.is_fitted  # CgOperator fitted a copy


def test_block_cg_recovers_from_poor_preconditioner() -> None:
    """A one-sample Jacobi estimate of a dense matrix is a poor preconditioner: rounding makes
    block CG stagnate, and the restart from the true residual has to recover."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=gen))
    matrix = (q * torch.logspace(-3, 3, 50)) @ q.T
    rhs = torch.randn(7, 50, generator=gen)
    op = CgOperator(
        MatrixOperator(matrix),
        0.01,
        rtol=1e-10,
        atol=0.0,
        preconditioner=JacobiPreconditioner(),
        use_block_cg=True,
    )
    x = op.apply(rhs)
    assert op.diagnostics.converged
    assert rel_err(x, torch.linalg.solve(matrix + 0.01 * torch.eye(50), rhs.T).T) < 1e-8


def test_jacobi_estimate_is_exact_for_diagonal_matrix() -> None:
    diagonal = torch.logspace(0, 2, 10)  # no entry below the floor, 1e-2 * mean
    pre = JacobiPreconditioner(num_samples_estimator=2).fit(
        MatrixOperator(torch.diag(diagonal)), 0.5
    )
    assert rel_err(pre.diagonal, diagonal) < 1e-14
    rhs = torch.randn(3, 10)
    assert rel_err(pre.solve(rhs), rhs / (diagonal + 0.5)) < 1e-14
    assert rel_err(pre.with_regularization(2.0).solve(rhs), rhs / (diagonal + 2.0)) < 1e-14


def test_nystroem_preconditioner_full_rank_is_exact_inverse_up_to_scale() -> None:
    matrix = ill_conditioned_matrix(15)
    pre = NystroemPreconditioner(rank=40).fit(MatrixOperator(matrix), 0.1)  # rank reduced to 15
    assert pre.low_rank_approx is not None and pre.low_rank_approx.eigen_vals.shape == (15,)
    lam_r = float(pre.low_rank_approx.eigen_vals.min())
    expected = (lam_r + 0.1) * torch.linalg.inv(matrix + 0.1 * torch.eye(15))
    assert rel_err(pre.solve(torch.eye(15)), expected) < 1e-8


# --- CgInfluence against DirectInfluence on a trained MLP ---------------------------------


@pytest.mark.parametrize(
    "lam, preconditioner, solve_simultaneously",
    [
        (1e-3, None, False),
        (1e-3, None, True),
        (1e-3, NystroemPreconditioner(rank=10), False),
        (1e-2, JacobiPreconditioner(num_samples_estimator=4), False),
        (1e-2, JacobiPreconditioner(), True),
        (1e-2, NystroemPreconditioner(rank=10), True),
        (1e-1, None, False),
        (1e-1, None, True),
    ],
    ids=lambda v: (
        type(v).__name__
        if isinstance(v, (JacobiPreconditioner, NystroemPreconditioner))
        else str(v)
    ),
)
def test_cg_influence_matches_direct(trained, lam, preconditioner, solve_simultaneously) -> None:
    net, x, y = trained
    expected = direct(net, x, y, lam).influences(x[:8], y[:8], x, y)
    model = CgInfluence(
        net,
        F.cross_entropy,
        lam,
        rtol=1e-12,
        atol=0.0,
        preconditioner=preconditioner,
        solve_simultaneously=solve_simultaneously,
    ).fit(loader(x, y, N_TRAIN))
    values = model.influences(x[:8], y[:8], x, y)
    assert rel_err(values, expected) < 1e-8
    diagnostics = model.solver_diagnostics["model"]
    assert diagnostics is not None and diagnostics.converged
    assert diagnostics.method == ("block_cg" if solve_simultaneously else "cg")
    assert diagnostics.residual is not None and diagnostics.residual <= 1e-12
    assert len(diagnostics.details["iterations_per_rhs"]) == 8
    assert max(diagnostics.details["iterations_per_rhs"]) == diagnostics.iterations


def test_cg_influence_preconditioner_reduces_iterations(trained) -> None:
    net, x, y = trained
    iterations = {}
    for pre in (None, NystroemPreconditioner(rank=10)):
        model = CgInfluence(net, F.cross_entropy, 1e-3, rtol=1e-10, preconditioner=pre)
        model.fit(loader(x, y, N_TRAIN)).influence_factors(x[:4], y[:4])
        iterations[type(pre).__name__] = model.solver_diagnostics["model"].iterations
    assert iterations["NystroemPreconditioner"] < iterations["NoneType"], iterations


@pytest.mark.parametrize("precompute_grad", [False, True])
def test_cg_gauss_newton_matches_empirical_fisher(trained, precompute_grad: bool) -> None:
    net, x, y = trained
    params = {k: v.detach() for k, v in net.named_parameters()}

    def sample_loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    def flat_grads(xx, yy):
        g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, xx, yy)
        return torch.cat([g[k].reshape(len(xx), -1) for k in params], dim=1)

    g_train = flat_grads(x, y)
    fisher = g_train.T @ g_train / len(x)
    g_test = flat_grads(x[:5], y[:5])
    expected = g_test @ torch.linalg.solve(fisher + 0.01 * torch.eye(len(fisher)), g_train.T)
    model = CgInfluence(
        net,
        F.cross_entropy,
        0.01,
        rtol=1e-12,
        atol=0.0,
        precompute_grad=precompute_grad,
        second_order_mode=SecondOrderMode.GAUSS_NEWTON,
    ).fit(loader(x, y, 32))
    assert rel_err(model.influences(x[:5], y[:5], x, y), expected) < 1e-8


def test_cg_independent_of_batch_size(trained) -> None:
    net, x, y = trained
    results = [
        CgInfluence(net, F.cross_entropy, 0.01, rtol=1e-12, atol=0.0)
        .fit(loader(x, y, batch_size))
        .influence_factors(x[:4], y[:4])
        for batch_size in (N_TRAIN, 50, 35)  # one batch, 50+50+20, 3*35+15
    ]
    for other in results[1:]:
        assert rel_err(other, results[0]) < 1e-9


@pytest.mark.parametrize("solve_simultaneously", [False, True])
def test_cg_layer_wise_with_regularization_per_block(trained, solve_simultaneously) -> None:
    net, x, y = trained
    lam = {"0": 0.01, "2": 0.05}
    expected = direct(net, x, y, lam, block_structure=BlockMode.LAYER_WISE)
    model = CgInfluence(
        net,
        F.cross_entropy,
        lam,
        rtol=1e-12,
        atol=0.0,
        preconditioner=NystroemPreconditioner(rank=25),
        solve_simultaneously=solve_simultaneously,
        block_structure=BlockMode.LAYER_WISE,
    ).fit(loader(x, y, N_TRAIN))
    assert (
        rel_err(model.influences(x[:6], y[:6], x, y), expected.influences(x[:6], y[:6], x, y))
        < 1e-8
    )
    blocks = model.block_mapper.composable_block_dict
    preconditioners = [block.op.preconditioner for block in blocks.values()]
    # one fitted copy per block, the rank clipped to the block size
    assert [p.low_rank_approx.projections.shape[0] for p in preconditioners] == [36, 21]
    assert preconditioners[1].low_rank_approx.projections.shape[1] <= 21
    assert set(model.solver_diagnostics) == {"0", "2"}
    assert all(d is not None and d.converged for d in model.solver_diagnostics.values())


def test_block_cg_influence_more_test_points_than_parameters(trained) -> None:
    net, x, y = trained
    expected = direct(net, x, y, 0.01, block_structure=BlockMode.LAYER_WISE)
    model = CgInfluence(
        net,
        F.cross_entropy,
        0.01,
        rtol=1e-12,
        atol=0.0,
        solve_simultaneously=True,
        block_structure=BlockMode.LAYER_WISE,
    ).fit(loader(x, y, N_TRAIN))
    factors = model.influence_factors(x[:80], y[:80])  # 80 > 36 and 80 > 21 parameters
    assert rel_err(factors, expected.influence_factors(x[:80], y[:80])) < 1e-8


def test_with_regularization_reuses_preconditioner(trained) -> None:
    net, x, y = trained
    model = CgInfluence(
        net, F.cross_entropy, 0.1, rtol=1e-12, atol=0.0, preconditioner=JacobiPreconditioner()
    ).fit(loader(x, y, N_TRAIN))
    changed = model.with_regularization(0.01)
    old_op = model.block_mapper.composable_block_dict["model"].op
    new_op = changed.block_mapper.composable_block_dict["model"].op
    assert new_op.operator is old_op.operator
    assert new_op.preconditioner.diagonal is old_op.preconditioner.diagonal  # not refitted
    assert new_op.regularization == 0.01 and new_op.preconditioner.regularization == 0.01
    expected = direct(net, x, y, 0.01).influence_factors(x[:4], y[:4])
    assert rel_err(changed.influence_factors(x[:4], y[:4]), expected) < 1e-8
    assert old_op.regularization == 0.1  # the original is unchanged


# --- non-convergence and diagnostics ----------------------------------------------------


@pytest.mark.parametrize("solve_simultaneously", [False, True])
def test_non_convergence_warns_with_residual(trained, caplog, solve_simultaneously) -> None:
    net, x, y = trained
    model = CgInfluence(
        net,
        F.cross_entropy,
        1e-3,
        maxiter=3,
        solve_simultaneously=solve_simultaneously,
    ).fit(loader(x, y, N_TRAIN))
    with caplog.at_level(logging.DEBUG, logger="influx"):
        model.influence_factors(x[:4], y[:4])
    diagnostics = model.solver_diagnostics["model"]
    assert not diagnostics.converged and diagnostics.iterations == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "did not converge" in warnings[0].getMessage()
    assert f"relative residual {diagnostics.residual:.3g}" in warnings[0].getMessage()


def test_non_convergence_logs_debug_without_warning(trained, caplog) -> None:
    net, x, y = trained
    model = CgInfluence(net, F.cross_entropy, 1e-3, maxiter=2, warn_on_max_iteration=False).fit(
        loader(x, y, N_TRAIN)
    )
    with caplog.at_level(logging.DEBUG, logger="influx"):
        model.influence_factors(x[:4], y[:4])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    debug = [r for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(debug) == 1 and debug[0].levelno == logging.DEBUG


def test_diagnostics_none_before_solving(trained) -> None:
    net, x, y = trained
    model = CgInfluence(net, F.cross_entropy, 0.1)
    assert model.solver_diagnostics == OrderedDict([("model", None)])
    model.fit(loader(x, y, N_TRAIN))
    assert model.solver_diagnostics["model"] is None
    model.influence_factors(x[:2], y[:2])
    assert model.solver_diagnostics["model"].converged


# --- LiSSA ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(SecondOrderMode))
def test_lissa_full_batch_matches_direct(trained, mode) -> None:
    net, x, y = trained
    expected = direct(net, x, y, 0.1, second_order_mode=mode).influences(x[:6], y[:6], x, y)
    model = LissaInfluence(
        net, F.cross_entropy, 0.1, maxiter=2000, rtol=1e-6, scale=1.2, second_order_mode=mode
    ).fit(loader(x, y, N_TRAIN))
    assert rel_err(model.influences(x[:6], y[:6], x, y), expected) < 1e-2
    diagnostics = model.solver_diagnostics["model"]
    assert diagnostics.method == "lissa" and diagnostics.converged
    assert diagnostics.details["scale"] == 1.2


def test_lissa_mini_batches_approach_direct(trained) -> None:
    net, x, y = trained
    expected = direct(net, x, y, 0.1).influence_factors(x[:4], y[:4])
    model = LissaInfluence(
        net, F.cross_entropy, 0.1, maxiter=150, scale=1.2, warn_on_max_iteration=False
    ).fit(loader(x, y, 40))
    assert rel_err(model.influence_factors(x[:4], y[:4]), expected) < 5e-2


def test_lissa_layer_wise_regularization_dict(trained) -> None:
    net, x, y = trained
    lam = {"0": 0.1, "2": 0.2}
    expected = direct(net, x, y, lam, block_structure=BlockMode.LAYER_WISE)
    model = LissaInfluence(
        net,
        F.cross_entropy,
        lam,
        maxiter=2000,
        rtol=1e-5,
        scale="auto",
        block_structure=BlockMode.LAYER_WISE,
    ).fit(loader(x, y, N_TRAIN))
    values = model.influence_factors(x[:4], y[:4])
    assert rel_err(values, expected.influence_factors(x[:4], y[:4])) < 1e-2
    changed = model.with_regularization(0.3)
    new_op = changed.block_mapper.composable_block_dict["0"].op
    old_op = model.block_mapper.composable_block_dict["0"].op
    assert new_op.largest_eigenvalue == old_op.largest_eigenvalue  # estimated once
    assert new_op.scale == pytest.approx(1.5 * (old_op.largest_eigenvalue + 0.3))


def scaled_linear_regression() -> Tuple[LinearRegression, DataLoader]:
    """Linear regression whose Hessian has a largest eigenvalue of about 7."""
    problem = LinearRegression(n=40, d=4, m=2)
    problem.x = 3.0 * problem.x
    return problem, loader(problem.x, problem.y, 40)


def test_lissa_divergence_asks_to_increase_scale() -> None:
    problem, data = scaled_linear_regression()
    assert float(torch.linalg.eigvalsh(problem.hessian()).max()) > 2.0
    model = LissaInfluence(problem.model, problem.loss, 0.01, scale=1.0).fit(data)
    with pytest.raises(ValueError, match="Increase 'scale'"):
        model.influence_factors(problem.x_test, problem.y_test)


def test_lissa_auto_scale_converges_where_scale_one_diverges() -> None:
    problem, data = scaled_linear_regression()
    lam = 2.0
    with pytest.raises(ValueError, match="Increase 'scale'"):
        LissaInfluence(problem.model, problem.loss, lam, scale=1.0).fit(data).influence_factors(
            problem.x_test, problem.y_test
        )
    model = LissaInfluence(
        problem.model, problem.loss, lam, maxiter=1000, rtol=1e-8, scale="auto"
    ).fit(data)
    values = model.influence_factors(problem.x_test, problem.y_test)
    hessian = problem.hessian() + lam * torch.eye(problem.n_params)
    expected = torch.linalg.solve(hessian, problem.grads(problem.x_test, problem.y_test).T).T
    assert rel_err(values, expected) < 1e-6
    assert model.solver_diagnostics["model"].converged
    largest = float(torch.linalg.eigvalsh(problem.hessian()).max())
    scale = model.solver_diagnostics["model"].details["scale"]
    assert 1.5 * (0.9 * largest + lam) <= scale <= 1.5 * (largest + lam) + 1e-9


class CountingLoader:
    """An iterable of batches that counts how often it is iterated."""

    def __init__(self, data: DataLoader):
        self.data = data
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.data)


def test_lissa_operator_iterates_loader_repeatedly() -> None:
    problem = LinearRegression(n=40)
    data = CountingLoader(
        DataLoader(TensorDataset(problem.x, problem.y), batch_size=16, shuffle=True)
    )
    op = LissaOperator(
        HessianBatchOperation(problem.model, problem.loss),
        data,
        regularization=0.5,
        maxiter=10,
        rtol=1e-30,
        scale=5.0,
        warn_on_max_iteration=False,
    )
    op.apply(torch.randn(2, problem.n_params))
    # 3 batches per pass, 10 iterations; one more for the spectrum estimate (once)
    assert data.passes == 5
    op.apply(torch.randn(2, problem.n_params))
    assert data.passes == 9
    assert op.diagnostics.iterations == 10 and not op.diagnostics.converged


@pytest.mark.parametrize("warn", [True, False])
def test_lissa_non_convergence_is_logged(trained, caplog, warn: bool) -> None:
    net, x, y = trained
    model = LissaInfluence(
        net, F.cross_entropy, 0.1, maxiter=5, scale=1.2, warn_on_max_iteration=warn
    ).fit(loader(x, y, N_TRAIN))
    with caplog.at_level(logging.DEBUG, logger="influx"):
        model.influence_factors(x[:3], y[:3])
    diagnostics = model.solver_diagnostics["model"]
    assert not diagnostics.converged and diagnostics.iterations == 5
    records = [r for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == (logging.WARNING if warn else logging.DEBUG)
    assert f"relative change {diagnostics.residual:.3g}" in records[0].getMessage()


def test_lissa_function_rejects_non_finite() -> None:
    def batches():
        while True:
            yield None

    with pytest.raises(ValueError, match="Increase 'scale'"):
        lissa(lambda b, v: v * float("inf"), batches(), torch.ones(1, 3))


def test_progress_bars_run(trained, capsys) -> None:
    """`progress=True` shows the solvers' bars (tqdm writes to stderr) and changes no value."""
    net, x, y = trained
    for solve_simultaneously, bar in ((False, "CG"), (True, "block CG")):
        quiet = CgInfluence(
            net, F.cross_entropy, 0.1, solve_simultaneously=solve_simultaneously
        ).fit(loader(x, y, N_TRAIN))
        shown = CgInfluence(
            net, F.cross_entropy, 0.1, progress=True, solve_simultaneously=solve_simultaneously
        ).fit(loader(x, y, N_TRAIN))
        capsys.readouterr()
        values = shown.influence_factors(x[:2], y[:2])
        assert f"{bar}:" in capsys.readouterr().err
        assert torch.equal(values, quiet.influence_factors(x[:2], y[:2]))
    LissaInfluence(net, F.cross_entropy, 0.1, maxiter=5, progress=True).fit(
        loader(x, y, N_TRAIN)
    ).influence_factors(x[:2], y[:2])
    assert "LiSSA:" in capsys.readouterr().err


# --- bad parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"regularization": -1.0}, "'regularization'"),
        ({"rtol": 0.0}, "'rtol'"),
        ({"rtol": -1e-3}, "'rtol'"),
        ({"atol": -1.0}, "'atol'"),
        ({"maxiter": 0}, "'maxiter'"),
    ],
)
def test_cg_bad_parameters(kwargs, match) -> None:
    matrix_op = MatrixOperator(torch.eye(3))
    with pytest.raises(ValueError, match=match):
        CgOperator(matrix_op, **kwargs)
    with pytest.raises(ValueError, match=match):
        CgInfluence(make_mlp(), F.cross_entropy, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"regularization": -1.0}, "'regularization'"),
        ({"rtol": 0.0}, "'rtol'"),
        ({"maxiter": 0}, "'maxiter'"),
        ({"dampen": 1.0}, "'dampen'"),
        ({"dampen": -0.1}, "'dampen'"),
        ({"scale": 0.0}, "'scale'"),
        ({"scale": -2.0}, "'scale'"),
        ({"scale": "big"}, "'scale'"),
    ],
)
def test_lissa_bad_parameters(kwargs, match) -> None:
    problem = LinearRegression()
    batch_op = HessianBatchOperation(problem.model, problem.loss)
    with pytest.raises(ValueError, match=match):
        LissaOperator(batch_op, loader(problem.x, problem.y), **kwargs)
    with pytest.raises(ValueError, match=match):
        LissaInfluence(problem.model, problem.loss, **kwargs)


def test_preconditioner_bad_parameters() -> None:
    with pytest.raises(ValueError, match="'rank' must be a positive int, got 0"):
        NystroemPreconditioner(rank=0)
    with pytest.raises(ValueError, match="'num_samples_estimator' must be a positive int, got -1"):
        JacobiPreconditioner(num_samples_estimator=-1)
    with pytest.raises(TypeError, match="'rank'"):
        NystroemPreconditioner(rank=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not fitted"):
        JacobiPreconditioner().solve(torch.ones(3))
    with pytest.raises(ValueError, match="'regularization'"):
        JacobiPreconditioner().fit(MatrixOperator(torch.eye(3)), -0.1)
    with pytest.raises(TypeError, match="'preconditioner'"):
        CgOperator(MatrixOperator(torch.eye(3)), preconditioner="jacobi")  # type: ignore[arg-type]


def test_cg_influence_float32(trained) -> None:
    net, x, y = trained
    expected = direct(net, x, y, 0.01).influence_factors(x[:4], y[:4])
    net32, x32 = copy.deepcopy(net).float(), x.float()
    for solve_simultaneously in (False, True):
        model = CgInfluence(
            net32,
            F.cross_entropy,
            0.01,
            rtol=1e-5,
            atol=0.0,
            preconditioner=NystroemPreconditioner(rank=10),
            solve_simultaneously=solve_simultaneously,
        ).fit(loader(x32, y, N_TRAIN))
        factors = model.influence_factors(x32[:4], y[:4])
        assert factors.dtype == torch.float32
        assert rel_err(factors.double(), expected) < 1e-3


@pytest.mark.parametrize("solver", [conjugate_gradient, block_conjugate_gradient])
def test_cg_rejects_non_finite_operator(solver) -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        solver(lambda v: v * float("nan"), torch.ones(2, 3))


def test_cg_rejects_badly_shaped_input() -> None:
    op = CgOperator(MatrixOperator(torch.eye(3)))
    with pytest.raises(ValueError, match="'tensor'"):
        op.apply(torch.ones(2, 4))
