"""Lanczos, Nyström, LowRankOperator / LowRankBilinearForm, ArnoldiInfluence and
NystroemSketchInfluence against explicit linear algebra and DirectInfluence."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx import InfluenceMode
from influx.torch import (
    ArnoldiInfluence,
    BlockMode,
    DirectInfluence,
    HessianOperator,
    LowRankBilinearForm,
    LowRankOperator,
    LowRankProductRepresentation,
    MatrixOperator,
    NystroemSketchInfluence,
    OperatorBilinearForm,
    SecondOrderMode,
    TorchBatch,
    TorchGradientProvider,
    lanczos_eigenpairs,
    lanczos_low_rank,
    model_hessian_low_rank,
    model_hessian_nystroem_approximation,
    nystroem_low_rank,
)
from influx.torch.functional import randomized_nystroem_approximation
from influx.torch.operator import curvature_operator

F = torch.nn.functional
HESSIAN, GAUSS_NEWTON = SecondOrderMode.HESSIAN, SecondOrderMode.GAUSS_NEWTON


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    opt = torch.optim.LBFGS(net.parameters(), max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(net(x), y) + 1e-3 * sum((p**2).sum() for p in net.parameters())
        value.backward()
        return value

    opt.step(closure)
    return net


@pytest.fixture(scope="module")
def trained() -> tuple:
    """A small MLP (57 parameters) trained to a minimum, and its data."""
    x, y = classification_data(n=60)
    net = train(make_mlp(), x, y)
    return net, x, y


@pytest.fixture(scope="module")
def direct(trained) -> dict:
    net, x, y = trained
    cache: dict = {}

    def get(lam: float, mode: SecondOrderMode = HESSIAN, mode_i=InfluenceMode.Up):
        key = (lam, mode, mode_i)
        if key not in cache:
            model = DirectInfluence(net, F.cross_entropy, lam, second_order_mode=mode)
            cache[key] = model.fit(loader(x, y)).influences(x[:5], y[:5], x, y, mode=mode_i)
        return cache[key]

    return {"get": get}


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def symmetric_with_null_space(p: int, zeros: int, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=gen)
    evals, evecs = torch.linalg.eigh((a + a.T) / 2)
    evals[:zeros] = 0.0
    return evecs @ torch.diag(evals) @ evecs.T, evals


def largest_magnitude(evals: torch.Tensor, k: int) -> torch.Tensor:
    return evals[torch.argsort(evals.abs(), descending=True)][:k]


# --- Lanczos ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, rank, krylov, block",
    [(50, 5, None, None), (120, 10, None, None), (60, 10, 25, 3), (50, 49, 50, None)],
)
def test_lanczos_matches_eigh(p, rank, krylov, block) -> None:
    a, evals = symmetric_with_null_space(p, zeros=7)
    result = lanczos_eigenpairs(
        lambda rows: rows @ a,
        p,
        rank,
        krylov_dimension=krylov,
        block_size=block,
        dtype=torch.float64,
    )
    d = result.representation.eigen_vals
    v = result.representation.projections
    assert torch.allclose(d, largest_magnitude(evals, rank), atol=1e-10)
    assert torch.allclose(v.T @ v, torch.eye(rank), atol=1e-12)
    # relative to |θ|, or to 1e-8 |A| for the eigenvalues that are zero
    scale = d.abs().clamp(min=1e-8 * float(d.abs().max()))
    residuals = torch.linalg.norm(a @ v - v * d, dim=0) / scale
    assert float(residuals.max()) < 2e-6
    diag = result.diagnostics
    assert diag.method == "lanczos" and diag.converged and diag.iterations >= rank
    # the reported residual is the actual one
    assert diag.residual == pytest.approx(float(residuals.max()), rel=1e-3, abs=1e-6)


def test_lanczos_float32_and_non_convergence(caplog) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(100, 100, generator=gen, dtype=torch.float32)
    a = (a + a.T) / 2
    result = lanczos_eigenpairs(lambda rows: rows @ a, 100, 8, dtype=torch.float32)
    expected = largest_magnitude(torch.linalg.eigvalsh(a.double()), 8)
    assert result.representation.eigen_vals.dtype == torch.float32
    assert torch.allclose(result.representation.eigen_vals.double(), expected, rtol=1e-4)
    with caplog.at_level(logging.WARNING):
        stopped = lanczos_eigenpairs(lambda rows: rows @ a, 100, 8, max_iter=0)
    assert not stopped.diagnostics.converged
    assert stopped.diagnostics.details["restarts"] == 0
    assert "Lanczos did not converge" in caplog.text


# --- Nyström ---------------------------------------------------------------------------------


def test_nystroem_known_psd_matrix() -> None:
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    evals = torch.exp(-0.5 * torch.arange(40.0))
    a = q @ torch.diag(evals) @ q.T
    full = randomized_nystroem_approximation(lambda x: a @ x, 40, 40, torch.float64)
    rebuilt = full.projections @ torch.diag(full.eigen_vals) @ full.projections.T
    assert rel_err(rebuilt, a) < 1e-10
    # exact for a PSD matrix of rank <= r
    low = q[:, :6] @ torch.diag(evals[:6]) @ q[:, :6].T
    sketch = randomized_nystroem_approximation(lambda x: low @ x, 40, 6, torch.float64)
    assert torch.allclose(sketch.eigen_vals, evals[:6], rtol=1e-10)
    # on a decaying spectrum the error falls with the rank and stays near the optimum
    errors = []
    for rank in (5, 10, 20):
        s = randomized_nystroem_approximation(lambda x: a @ x, 40, rank, torch.float64)
        errors.append(rel_err(s.projections @ torch.diag(s.eigen_vals) @ s.projections.T, a))
        optimal = float(torch.linalg.norm(evals[rank:]) / torch.linalg.norm(evals))
        assert errors[-1] < 20 * optimal
    assert errors[0] > errors[1] > errors[2]


def test_nystroem_negative_curvature_warns(caplog) -> None:
    a, _ = symmetric_with_null_space(30, zeros=0)
    with caplog.at_level(logging.WARNING):
        result = nystroem_low_rank(MatrixOperator(a), 30)
    assert "negative curvature" in caplog.text
    assert result.diagnostics.details["negative_curvature"]
    assert result.representation.eigen_vals.numel() < 30


# --- LowRankOperator and its bilinear form ---------------------------------------------------


def random_representation(p: int = 12, r: int = 5) -> LowRankProductRepresentation:
    gen = torch.Generator().manual_seed(2)
    v, _ = torch.linalg.qr(torch.randn(p, r, generator=gen))
    d = torch.rand(r, generator=gen) * 3 + 0.5
    return LowRankProductRepresentation(d, v)


def test_low_rank_operator_matches_explicit_inverse() -> None:
    rep = random_representation()
    v, d = rep.projections, rep.eigen_vals
    b = torch.randn(4, 12)
    lam = 0.05
    woodbury = LowRankOperator(rep, lam, exact=True)
    explicit = torch.linalg.inv(v @ torch.diag(d) @ v.T + lam * torch.eye(12))
    assert rel_err(woodbury.apply(b), b @ explicit) < 1e-12
    projected = LowRankOperator(rep, lam, exact=False)
    assert rel_err(projected.apply(b), b @ (v @ torch.diag(1 / (d + lam)) @ v.T)) < 1e-12
    assert (
        rel_err(LowRankOperator(rep, None, exact=False).apply(b[0]), (b[0] @ v / d) @ v.T) < 1e-12
    )
    # the bilinear form pairs through the projections and agrees with the plain one
    for op in (woodbury, projected):
        form = op.as_bilinear_form()
        assert isinstance(form, LowRankBilinearForm)
        plain = OperatorBilinearForm(op)
        assert rel_err(form.inner_prod(b, b[:2]), plain.inner_prod(b, b[:2])) < 1e-12
        assert rel_err(form.inner_prod(b, None), plain.inner_prod(b, None)) < 1e-12


def test_low_rank_operator_with_regularization_and_warnings(caplog) -> None:
    rep = random_representation()
    op = LowRankOperator(rep, 0.1)
    other = op.with_regularization(0.2)
    assert other.low_rank_representation is rep and other.regularization == 0.2
    b = torch.randn(3, 12)
    assert rel_err(other.apply(b), LowRankOperator(rep, 0.2).apply(b)) < 1e-14
    negative = LowRankProductRepresentation(torch.tensor([2.0, -0.5, -0.1]), rep.projections[:, :3])
    with caplog.at_level(logging.WARNING):
        LowRankOperator(negative, 0.1, exact=False)
    assert "not positive" in caplog.text
    # a zero entry of D + λ is dropped (pseudo-inverse) instead of dividing by zero
    singular = LowRankProductRepresentation(torch.tensor([2.0, -0.1]), rep.projections[:, :2])
    out = LowRankOperator(singular, 0.1, exact=False).apply(b)
    assert torch.isfinite(out).all()
    v0 = rep.projections[:, 0]
    assert rel_err(out, torch.outer(b @ v0, v0) / 2.1) < 1e-12


@pytest.mark.parametrize("exact", [True, False])
def test_low_rank_bilinear_form_equals_operator_bilinear_form(trained, exact) -> None:
    net, x, y = trained
    p = n_params(net)
    gen = torch.Generator().manual_seed(4)
    v, _ = torch.linalg.qr(torch.randn(p, 8, generator=gen))
    op = LowRankOperator(LowRankProductRepresentation(torch.rand(8, generator=gen), v), 0.01, exact)
    gp = TorchGradientProvider(net, F.cross_entropy)
    left, right = TorchBatch(x[:4], y[:4]), TorchBatch(x[10:30], y[10:30])
    form, plain = op.as_bilinear_form(), OperatorBilinearForm(op)
    for r in (right, None):
        expected = plain.grads_inner_prod(left, r, gp)
        assert rel_err(form.grads_inner_prod(left, r, gp), expected) < 1e-12
    assert (
        rel_err(
            form.mixed_grads_inner_prod(left, right, gp),
            plain.mixed_grads_inner_prod(left, right, gp),
        )
        < 1e-12
    )


# --- ArnoldiInfluence ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, lam, drop", [(HESSIAN, 1e-3, 1), (HESSIAN, 1e-1, 0), (GAUSS_NEWTON, 1e-2, 1)]
)
def test_arnoldi_full_rank_matches_direct(trained, direct, mode, lam, drop) -> None:
    """rank = P, or P - 1: the Hessian of a softmax model has a null space."""
    net, x, y = trained
    model = ArnoldiInfluence(
        net,
        F.cross_entropy,
        lam,
        rank=n_params(net) - drop,
        use_woodbury=True,
        second_order_mode=mode,
    ).fit(loader(x, y, 60))
    assert rel_err(model.influences(x[:5], y[:5], x, y), direct["get"](lam, mode)) < 1e-8


def test_arnoldi_error_decreases_with_rank(trained, direct) -> None:
    net, x, y = trained
    p = n_params(net)
    lam = 1e-2
    expected = direct["get"](lam)
    gp = TorchGradientProvider(net, F.cross_entropy)
    g_test, g_train = gp.flat_grads(TorchBatch(x[:5], y[:5])), gp.flat_grads(TorchBatch(x, y))
    errors: dict = {True: [], False: []}
    for rank in (10, 25, 40):
        model = ArnoldiInfluence(
            net, F.cross_entropy, lam, rank=rank, krylov_dimension=p, use_woodbury=True
        ).fit(loader(x, y, 60))
        errors[True].append(rel_err(model.influences(x[:5], y[:5], x, y), expected))
        # the projected inverse from the same eigenpairs
        rep = model.block_mapper.composable_block_dict["model"].op.low_rank_representation
        projected = LowRankOperator(rep, lam, exact=False).apply(g_test) @ g_train.T
        errors[False].append(rel_err(projected, expected))
    for values in errors.values():
        assert values[0] > values[1] > values[2]


def test_arnoldi_restarted_lanczos_matches_truncated_eigendecomposition(trained) -> None:
    """Default Krylov dimension (restarts), projected inverse, against eigh of the Hessian."""
    net, x, y = trained
    lam, rank = 1e-2, 8
    model = ArnoldiInfluence(net, F.cross_entropy, lam, rank=rank, tol=1e-10)
    model.fit(loader(x, y, 60))
    h = HessianOperator(net, F.cross_entropy, loader(x, y)).to_dense()
    evals, evecs = torch.linalg.eigh(h)
    top = torch.argsort(evals.abs(), descending=True)[:rank]
    inverse = evecs[:, top] @ torch.diag(1 / (evals[top] + lam)) @ evecs[:, top].T
    gp = TorchGradientProvider(net, F.cross_entropy)
    g_test, g_train = gp.flat_grads(TorchBatch(x[:5], y[:5])), gp.flat_grads(TorchBatch(x, y))
    expected = g_test @ inverse @ g_train.T
    assert rel_err(model.influences(x[:5], y[:5], x, y), expected) < 1e-8
    diag = model.solver_diagnostics["model"]
    assert diag.method == "lanczos" and diag.converged and diag.residual <= 1e-10
    assert diag.details["rank"] == rank and diag.details["krylov_dimension"] == 20
    low, high = diag.details["eigenvalue_range"]
    assert high == pytest.approx(float(evals.abs().max()), rel=1e-10)


def test_arnoldi_perturbation_and_with_regularization(trained, direct) -> None:
    net, x, y = trained
    p = n_params(net)
    model = ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=p).fit(loader(x, y, 60))
    expected = direct["get"](0.1, HESSIAN, InfluenceMode.Perturbation)
    values = model.influences(x[:5], y[:5], x, y, mode=InfluenceMode.Perturbation)
    assert rel_err(values, expected) < 1e-8
    other = model.with_regularization(1e-3)
    old_op = model.block_mapper.composable_block_dict["model"].op
    new_op = other.block_mapper.composable_block_dict["model"].op
    assert new_op.low_rank_representation is old_op.low_rank_representation
    # the Lanczos report is reused; the condition number is that of the new D + λI
    assert new_op.diagnostics.iterations == old_op.diagnostics.iterations
    assert new_op.diagnostics.regularization == 1e-3
    assert new_op.diagnostics.condition_number > old_op.diagnostics.condition_number
    assert rel_err(other.influences(x[:5], y[:5], x, y), direct["get"](1e-3)) < 1e-8


def test_arnoldi_float32(trained, direct) -> None:
    net, x, y = trained
    net32 = make_mlp()
    net32.load_state_dict(net.state_dict())
    net32 = net32.float()
    p = n_params(net)
    model = ArnoldiInfluence(net32, F.cross_entropy, 0.1, rank=p, use_woodbury=True)
    model.fit(loader(x.float(), y, 60))
    values = model.influences(x[:5].float(), y[:5], x.float(), y)
    assert values.dtype == torch.float32
    assert rel_err(values.double(), direct["get"](0.1)) < 1e-3


def test_block_modes_with_per_block_regularization(trained) -> None:
    """Layer-wise blocks: '0' (36 parameters, truncated) and '2' (21, full rank)."""
    net, x, y = trained
    lams = {"0": 1e-2, "2": 1e-1}
    data = loader(x, y)
    arnoldi = ArnoldiInfluence(
        net, F.cross_entropy, lams, rank=21, use_woodbury=True, block_structure=BlockMode.LAYER_WISE
    ).fit(data)
    nystroem = NystroemSketchInfluence(
        net, F.cross_entropy, lams, 21, BlockMode.LAYER_WISE, GAUSS_NEWTON
    ).fit(data)
    reference = DirectInfluence(net, F.cross_entropy, lams, BlockMode.LAYER_WISE)
    reference_gn = DirectInfluence(
        net, F.cross_entropy, lams, BlockMode.LAYER_WISE, second_order_mode=GAUSS_NEWTON
    )
    by_block = arnoldi.influences_by_block(x[:5], y[:5], x, y)
    expected = reference.fit(data).influences_by_block(x[:5], y[:5], x, y)
    assert rel_err(by_block["2"], expected["2"]) < 1e-8
    nys = nystroem.influences_by_block(x[:5], y[:5], x, y)
    assert (
        rel_err(nys["2"], reference_gn.fit(data).influences_by_block(x[:5], y[:5], x, y)["2"])
        < 1e-8
    )
    # block '0' at rank 21 of 36: Woodbury with the top 21 eigenpairs of the block's Hessian
    params = {k: v for k, v in net.named_parameters() if k.startswith("0.")}
    h = curvature_operator(HESSIAN, net, F.cross_entropy, data, params).to_dense()
    evals, evecs = torch.linalg.eigh(h)
    top = torch.argsort(evals.abs(), descending=True)[:21]
    v, d = evecs[:, top], evals[top]
    inverse = (torch.eye(36) - v @ torch.diag(d / (d + 1e-2)) @ v.T) / 1e-2
    gp = TorchGradientProvider(net, F.cross_entropy, params)
    g_test, g_train = gp.flat_grads(TorchBatch(x[:5], y[:5])), gp.flat_grads(TorchBatch(x, y))
    assert rel_err(by_block["0"], g_test @ inverse @ g_train.T) < 1e-8
    assert list(arnoldi.solver_diagnostics) == ["0", "2"]


# --- NystroemSketchInfluence -----------------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_nystroem_full_rank_gauss_newton_matches_direct(trained, direct, lam) -> None:
    net, x, y = trained
    model = NystroemSketchInfluence(
        net, F.cross_entropy, lam, n_params(net), second_order_mode=GAUSS_NEWTON
    ).fit(loader(x, y))
    assert rel_err(model.influences(x[:5], y[:5], x, y), direct["get"](lam, GAUSS_NEWTON)) < 1e-8
    diag = model.solver_diagnostics["model"]
    assert diag.method == "nystroem" and not diag.details["negative_curvature"]
    other = model.with_regularization(lam * 10)
    assert (
        rel_err(other.influences(x[:5], y[:5], x, y), direct["get"](lam * 10, GAUSS_NEWTON)) < 1e-8
    )


def test_nystroem_logistic_regression_hessian_matches_direct() -> None:
    x, y = classification_data(n=50, d_in=4, n_classes=3)
    net = train(torch.nn.Linear(4, 3), x, y)
    data = loader(x, y, 16)
    expected = DirectInfluence(net, F.cross_entropy, 1e-3).fit(data).influences(x[:5], y[:5], x, y)
    model = NystroemSketchInfluence(net, F.cross_entropy, 1e-3, rank=15).fit(data)
    assert rel_err(model.influences(x[:5], y[:5], x, y), expected) < 1e-8


def test_nystroem_indefinite_hessian_warns(caplog) -> None:
    x, y = classification_data(n=60)
    net = make_mlp(seed=3)  # untrained: the Hessian is indefinite
    data = loader(x, y)
    h = HessianOperator(net, F.cross_entropy, data).to_dense()
    assert float(torch.linalg.eigvalsh(h)[0]) < -1e-3
    with caplog.at_level(logging.WARNING):
        model = NystroemSketchInfluence(net, F.cross_entropy, 0.1, n_params(net)).fit(data)
    assert "negative curvature" in caplog.text
    assert model.solver_diagnostics["model"].details["negative_curvature"]
    expected = DirectInfluence(net, F.cross_entropy, 0.1).fit(data).influences(x[:5], y[:5], x, y)
    assert rel_err(model.influences(x[:5], y[:5], x, y), expected) > 1e-3


def test_nystroem_error_decreases_with_rank(trained, direct) -> None:
    net, x, y = trained
    expected = direct["get"](1e-2, GAUSS_NEWTON)
    errors = []
    for rank in (30, 40, 50):
        model = NystroemSketchInfluence(
            net, F.cross_entropy, 1e-2, rank, second_order_mode=GAUSS_NEWTON
        ).fit(loader(x, y))
        errors.append(rel_err(model.influences(x[:5], y[:5], x, y), expected))
    assert errors[0] > errors[1] > errors[2]


def test_model_level_helpers(trained) -> None:
    net, x, y = trained
    data = loader(x, y)
    rep = model_hessian_low_rank(net, F.cross_entropy, loader(x, y, 60), rank=3, tol=1e-10)
    h = HessianOperator(net, F.cross_entropy, data).to_dense()
    assert torch.allclose(rep.eigen_vals, largest_magnitude(torch.linalg.eigvalsh(h), 3))
    gn = curvature_operator(GAUSS_NEWTON, net, F.cross_entropy, loader(x, y, 60))
    sketch = model_hessian_nystroem_approximation(net, F.cross_entropy, data, n_params(net))
    rebuilt = sketch.projections @ torch.diag(sketch.eigen_vals) @ sketch.projections.T
    assert rel_err(rebuilt, gn.to_dense()) < 1e-10
    top = lanczos_low_rank(gn, 2, krylov_dimension=n_params(net)).representation.eigen_vals
    assert torch.allclose(top, largest_magnitude(torch.linalg.eigvalsh(gn.to_dense()), 2))


# --- errors ----------------------------------------------------------------------------------


def test_errors(trained) -> None:
    net, x, y = trained
    loss = F.cross_entropy
    with pytest.raises(ValueError, match=r"'rank' must be in \[1, P\] with P = 57.*got 0"):
        ArnoldiInfluence(net, loss, 0.1, rank=0)
    with pytest.raises(TypeError, match="'rank' must be an int, got float"):
        ArnoldiInfluence(net, loss, 0.1, rank=2.0)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="'krylov_dimension' must be larger than rank = 10, got 10"
    ):
        ArnoldiInfluence(net, loss, 0.1, rank=10, krylov_dimension=10)
    with pytest.raises(ValueError, match="'tol' must be a positive number, got 0"):
        ArnoldiInfluence(net, loss, 0.1, tol=0)
    with pytest.raises(ValueError, match="'max_iter' must be a non-negative int"):
        ArnoldiInfluence(net, loss, 0.1, max_iter=-1)
    for bad in (None, 0.0):
        with pytest.raises(ValueError, match=rf"'regularization' must be positive.*got {bad}"):
            ArnoldiInfluence(net, loss, bad, use_woodbury=True)
        with pytest.raises(ValueError, match=rf"'regularization' must be positive.*got {bad}"):
            NystroemSketchInfluence(net, loss, bad, rank=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'regularization' must be positive.*'2': None"):
        NystroemSketchInfluence(net, loss, {"0": 0.1, "2": None}, 5, BlockMode.LAYER_WISE)
    with pytest.raises(ValueError, match="'regularization' must be a non-negative number"):
        ArnoldiInfluence(net, loss, -1.0)
    with pytest.raises(ValueError, match="'second_order_mode' must be one of"):
        ArnoldiInfluence(net, loss, 0.1, second_order_mode="newton")  # type: ignore[arg-type]
    model = ArnoldiInfluence(net, loss, 0.1, rank=3, use_woodbury=True)
    with pytest.raises(ValueError, match=r"'regularization' must be positive.*got None"):
        model.with_regularization(None)
    rep = random_representation()
    with pytest.raises(
        ValueError, match=r"'regularization' must be positive when exact=True.*None"
    ):
        LowRankOperator(rep)
    with pytest.raises(TypeError, match="'low_rank_representation' must be a LowRank"):
        LowRankOperator(torch.eye(3), 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'operator' must be a LowRankOperator, got MatrixOperator"):
        LowRankBilinearForm(MatrixOperator(torch.eye(3)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'tensor' must have shape \(12,\)"):
        LowRankOperator(rep, 0.1).apply(torch.ones(2, 5))
    matvec = lambda rows: rows  # noqa: E731
    with pytest.raises(
        ValueError, match=r"'krylov_dimension' must be in \[rank \+ 1, P\] = \[6, 30\].*got 40"
    ):
        lanczos_eigenpairs(matvec, 30, 5, krylov_dimension=40)
    with pytest.raises(ValueError, match=r"'block_size' must be in \[1, 7\].*got 8"):
        lanczos_eigenpairs(matvec, 30, 5, krylov_dimension=20, block_size=8)
    with pytest.raises(ValueError, match=r"'rank' must be in \[1, 30\], got 0"):
        randomized_nystroem_approximation(lambda v: v, 30, 0, torch.float64)


@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemSketchInfluence])
def test_rank_larger_than_a_block_is_clipped_with_a_warning(trained, direct, cls, caplog) -> None:
    """Layer-wise blocks of 36 and 21 parameters with rank 40: every block is complete, so
    the influences equal the direct ones of the same block structure (Gauss-Newton: PSD)."""
    net, x, y = trained
    lam = 1e-2
    with caplog.at_level(logging.WARNING, logger="influx.torch.inverse.low_rank"):
        model = cls(
            net,
            F.cross_entropy,
            lam,
            rank=40,
            block_structure=BlockMode.LAYER_WISE,
            second_order_mode=GAUSS_NEWTON,
            **({"use_woodbury": True} if cls is ArnoldiInfluence else {}),
        )
    assert "'rank' (40) exceeds the number of parameters of block '2' (21)" in caplog.text
    model.fit(loader(x, y, 60))
    expected = (
        DirectInfluence(
            net, F.cross_entropy, lam, BlockMode.LAYER_WISE, second_order_mode=GAUSS_NEWTON
        )
        .fit(loader(x, y, 60))
        .influences(x[:5], y[:5], x, y)
    )
    assert rel_err(model.influences(x[:5], y[:5], x, y), expected) < 1e-8
    with caplog.at_level(logging.WARNING, logger="influx.torch.functional"):
        sketch = randomized_nystroem_approximation(
            torch.eye(4, dtype=torch.float64), 4, 9, torch.float64
        )
    assert sketch.eigen_vals.shape == (4,)
    assert "'rank' (9) exceeds the dimension 4" in caplog.text


def test_nan_curvature_is_an_error_naming_the_block(trained) -> None:
    net, x, y = trained
    bad_x = x.clone()
    bad_x[3, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"Block 'model': The operator returned NaN or Inf in Lanczos"
    ):
        ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=2).fit(loader(bad_x, y, 60))
    with pytest.raises(ValueError, match=r"Block 'model': .*NaN or Inf in the Nyström sketch"):
        NystroemSketchInfluence(net, F.cross_entropy, 0.1, rank=2).fit(loader(bad_x, y, 60))


def test_reachable_where_the_reference_api_places_them() -> None:
    from influx.torch import (
        InverseHarmonicMeanBatchOperation,
        InverseHarmonicMeanOperator,
        base,
        batch_operation,
        operator,
    )

    assert operator.LowRankOperator is LowRankOperator
    assert operator.InverseHarmonicMeanOperator is InverseHarmonicMeanOperator
    assert base.LowRankBilinearForm is LowRankBilinearForm
    assert batch_operation.InverseHarmonicMeanBatchOperation is InverseHarmonicMeanBatchOperation
    with pytest.raises(AttributeError, match="has no attribute 'Missing'"):
        operator.Missing  # noqa: B018


@settings(max_examples=40, deadline=None)
@given(
    p=st.integers(2, 12),
    data=st.data(),
    lam=st.floats(1e-3, 1.0),
    exact=st.booleans(),
)
def test_low_rank_operator_property(p, data, lam, exact) -> None:
    """apply equals explicit matrix algebra for random orthonormal V and positive D."""
    r = data.draw(st.integers(1, p))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    v, _ = torch.linalg.qr(torch.randn(p, r, generator=gen))
    d = torch.rand(r, generator=gen) * 10
    op = LowRankOperator(LowRankProductRepresentation(d, v), lam, exact)
    if exact:
        matrix = torch.linalg.inv(v @ torch.diag(d) @ v.T + lam * torch.eye(p))
    else:
        matrix = v @ torch.diag(1 / (d + lam)) @ v.T
    b = torch.randn(3, p, generator=gen)
    assert torch.allclose(op.apply(b), b @ matrix, rtol=1e-9, atol=1e-9)
    assert torch.allclose(op.as_bilinear_form().inner_prod(b, b), b @ matrix @ b.T, atol=1e-8)
