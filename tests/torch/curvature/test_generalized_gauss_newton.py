"""The generalized Gauss-Newton curvature against closed forms and the solvers built on it.

All comparisons are in float64; the closed forms use `torch.func.jacrev` for the Jacobian
of the model outputs, formed explicitly here (the operator never forms it).
"""

from __future__ import annotations

from typing import Dict, Iterator

import pytest
from torch.func import functional_call, grad, jacrev, vmap

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from influx.torch.curvature.generalized_gauss_newton import GeneralizedGaussNewtonBatchOperation
from influx.torch.operator import (
    GeneralizedGaussNewtonOperator,
    HessianOperator,
    curvature_operator,
)

F = torch.nn.functional
GGN = SecondOrderMode.GENERALIZED_GAUSS_NEWTON
TOL = 1e-10


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(net: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in net.named_parameters()}


def output_jacobian(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian of all outputs `(N * C, P)` with respect to the flat parameters."""
    params = _params(net)
    jac = jacrev(lambda p: functional_call(net, p, (x,)))(params)
    rows = functional_call(net, params, (x,)).numel()
    return torch.cat([jac[k].reshape(rows, -1) for k in params], dim=1)


def cross_entropy_ggn(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    r"""$\frac1n \sum_i J_i^\top (\mathrm{diag}(p_i) - p_i p_i^\top) J_i$."""
    n = x.shape[0]
    with torch.no_grad():
        p = torch.softmax(net(x), dim=1)
    c = p.shape[1]
    j = output_jacobian(net, x).reshape(n, c, -1)
    h = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("nap,nab,nbq->pq", j, h, j) / n


# --- closed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("outputs", [1, 3])
def test_logistic_regression_ggn_equals_hessian(outputs: int) -> None:
    """A model linear in its parameters: the GGN is the Hessian."""
    x, y = classification_data(n=50, d_in=4, n_classes=max(outputs, 2))
    net = torch.nn.Linear(4, outputs)
    if outputs == 1:
        loss, target = F.binary_cross_entropy_with_logits, y.to(torch.float64).unsqueeze(1)
    else:
        loss, target = F.cross_entropy, y
    data = loader(x, target, 16)
    ggn = GeneralizedGaussNewtonOperator(net, loss, data).to_dense()
    hessian = HessianOperator(net, loss, data).to_dense()
    assert rel_err(ggn, hessian) < TOL
    if outputs == 3:
        assert rel_err(ggn, cross_entropy_ggn(net, x)) < TOL


def test_mse_mlp_ggn_equals_scaled_jacobian_gram() -> None:
    """MSE averages over all N * C output entries: G = 2 / (N C) J^T J."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, generator=gen)
    y = torch.randn(30, 3, generator=gen)
    net = make_mlp()
    op = GeneralizedGaussNewtonOperator(net, F.mse_loss, loader(x, y, 8))
    j = output_jacobian(net, x)
    expected = 2.0 / (30 * 3) * j.T @ j
    assert rel_err(op.to_dense(), expected) < TOL
    v = torch.randn(4, op.input_size, generator=gen)
    assert rel_err(op.apply(v), v @ expected) < TOL
    single = op.apply(v[0])
    assert single.shape == (op.input_size,)
    assert rel_err(single, expected @ v[0]) < TOL


def test_cross_entropy_mlp_ggn_closed_form_is_psd_unlike_hessian() -> None:
    x, y = classification_data(n=40)
    net = make_mlp()
    data = loader(x, y, 9)
    ggn = curvature_operator(GGN, net, F.cross_entropy, data).to_dense()
    assert rel_err(ggn, cross_entropy_ggn(net, x)) < TOL
    assert rel_err(ggn, ggn.T) < 1e-14
    scale = float(torch.linalg.eigvalsh(ggn).abs().max())
    assert float(torch.linalg.eigvalsh(ggn).min()) > -1e-12 * scale
    hessian = HessianOperator(net, F.cross_entropy, data).to_dense()
    assert float(torch.linalg.eigvalsh(hessian).min()) < -1e-6 * scale


def test_multi_dimensional_inputs_and_outputs() -> None:
    """Inputs `(N, 2, 3)` and outputs `(N, 2, 2)` (MSE over all entries)."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Unflatten(1, (2, 2))
    )
    x = torch.randn(12, 2, 3, generator=gen)
    y = torch.randn(12, 2, 2, generator=gen)
    op = GeneralizedGaussNewtonOperator(net, F.mse_loss, loader(x, y, 5))
    j = output_jacobian(net, x)
    expected = 2.0 / (12 * 4) * j.T @ j
    assert rel_err(op.to_dense(), expected) < TOL
    v = torch.randn(op.input_size, generator=gen)
    assert rel_err(op.apply(v), expected @ v) < TOL


def test_independent_of_batch_size() -> None:
    x, y = classification_data(n=61)
    net = make_mlp()
    dense = [
        GeneralizedGaussNewtonOperator(net, F.cross_entropy, loader(x, y, bs)).to_dense()
        for bs in (61, 7, 16, 1)
    ]
    for other in dense[1:]:
        assert rel_err(other, dense[0]) < 1e-12


def test_restricted_parameters_give_the_sub_matrix() -> None:
    x, y = classification_data(n=30)
    net = make_mlp()
    data = loader(x, y, 8)
    full = GeneralizedGaussNewtonOperator(net, F.cross_entropy, data).to_dense()
    restrict = {k: p for k, p in net.named_parameters() if k.startswith("2.")}
    sub = GeneralizedGaussNewtonOperator(net, F.cross_entropy, data, restrict).to_dense()
    start = sum(p.numel() for k, p in net.named_parameters() if k.startswith("0."))
    assert rel_err(sub, full[start:, start:]) < TOL
    batch_op = GeneralizedGaussNewtonBatchOperation(net, F.cross_entropy, restrict)
    assert batch_op.input_dict_structure == {"2.weight": (3, 6), "2.bias": (3,)}


def test_float32_model() -> None:
    x, y = classification_data(n=20)
    net = make_mlp()
    expected = GeneralizedGaussNewtonOperator(net, F.cross_entropy, loader(x, y)).to_dense()
    net32 = make_mlp().float()
    op = GeneralizedGaussNewtonOperator(net32, F.cross_entropy, loader(x.float(), y))
    dense = op.to_dense()
    assert dense.dtype == torch.float32
    assert rel_err(dense.double(), expected) < 1e-5


# --- solvers on the GGN ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_problem():
    x, y = classification_data(n=80)
    return make_mlp(), x, y


def test_direct_influence_matches_closed_form(mlp_problem) -> None:
    net, x, y = mlp_problem
    lam = 0.01
    model = DirectInfluence(net, F.cross_entropy, lam, second_order_mode=GGN)
    model.fit(loader(x, y, 16))
    ggn = cross_entropy_ggn(net, x)
    inverse = torch.linalg.inv(ggn + lam * torch.eye(len(ggn)))
    params = _params(net)

    def sample_loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    def flat_grads(xx, yy):
        g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, xx, yy)
        return torch.cat([g[k].reshape(len(xx), -1) for k in params], dim=1)

    expected = flat_grads(x[:4], y[:4]) @ inverse @ flat_grads(x, y).T
    assert rel_err(model.influences(x[:4], y[:4], x, y), expected) < TOL


@pytest.mark.parametrize("structure", [BlockMode.FULL, BlockMode.LAYER_WISE])
@pytest.mark.parametrize("solve_simultaneously", [False, True])
def test_cg_converges_to_direct(mlp_problem, structure, solve_simultaneously) -> None:
    net, x, y = mlp_problem
    data = loader(x, y, 16)
    expected = (
        DirectInfluence(net, F.cross_entropy, 1e-3, structure, second_order_mode=GGN)
        .fit(data)
        .influences(x[:6], y[:6], x, y)
    )
    model = CgInfluence(
        net,
        F.cross_entropy,
        1e-3,
        rtol=1e-12,
        atol=0.0,
        solve_simultaneously=solve_simultaneously,
        block_structure=structure,
        second_order_mode=GGN,
    ).fit(data)
    assert rel_err(model.influences(x[:6], y[:6], x, y), expected) < 1e-8
    assert all(d is not None and d.converged for d in model.solver_diagnostics.values())


def test_cg_precompute_grad_has_no_effect_with_ggn(mlp_problem) -> None:
    net, x, y = mlp_problem
    data = loader(x, y, 16)
    plain = CgInfluence(net, F.cross_entropy, 0.01, rtol=1e-12, atol=0.0, second_order_mode=GGN)
    pre = CgInfluence(
        net,
        F.cross_entropy,
        0.01,
        rtol=1e-12,
        atol=0.0,
        precompute_grad=True,
        second_order_mode=GGN,
    )
    a = plain.fit(data).influence_factors(x[:3], y[:3])
    b = pre.fit(data).influence_factors(x[:3], y[:3])
    assert rel_err(b, a) < 1e-12


def test_arnoldi_full_rank_converges_to_direct(mlp_problem) -> None:
    net, x, y = mlp_problem
    data = loader(x, y, 16)
    expected = (
        DirectInfluence(net, F.cross_entropy, 1e-2, second_order_mode=GGN)
        .fit(data)
        .influences(x[:6], y[:6], x, y)
    )
    size = sum(p.numel() for p in net.parameters())
    model = ArnoldiInfluence(
        net, F.cross_entropy, 1e-2, rank=size, tol=1e-12, second_order_mode=GGN
    ).fit(data)
    assert rel_err(model.influences(x[:6], y[:6], x, y), expected) < 1e-8


def test_nystroem_full_rank_matches_direct(mlp_problem) -> None:
    """The GGN is positive semi-definite: a full-rank sketch is exact (no warning needed)."""
    net, x, y = mlp_problem
    data = loader(x, y, 16)
    expected = (
        DirectInfluence(net, F.cross_entropy, 1e-2, second_order_mode=GGN)
        .fit(data)
        .influences(x[:4], y[:4], x, y)
    )
    size = sum(p.numel() for p in net.parameters())
    model = NystroemSketchInfluence(net, F.cross_entropy, 1e-2, rank=size, second_order_mode=GGN)
    assert rel_err(model.fit(data).influences(x[:4], y[:4], x, y), expected) < 1e-8


def test_lissa_converges_to_direct(mlp_problem) -> None:
    net, x, y = mlp_problem
    expected = (
        DirectInfluence(net, F.cross_entropy, 0.1, second_order_mode=GGN)
        .fit(loader(x, y, 80))
        .influence_factors(x[:4], y[:4])
    )
    model = LissaInfluence(
        net, F.cross_entropy, 0.1, maxiter=3000, rtol=1e-8, scale=1.0, second_order_mode=GGN
    ).fit(loader(x, y, 80))
    assert rel_err(model.influence_factors(x[:4], y[:4]), expected) < 1e-4
    diagnostics = model.solver_diagnostics["model"]
    assert diagnostics is not None and diagnostics.converged


# --- errors ---------------------------------------------------------------------------------


def test_unknown_mode_lists_the_generalized_gauss_newton() -> None:
    x, y = classification_data(n=10)
    with pytest.raises(ValueError, match="GENERALIZED_GAUSS_NEWTON.*got 'ggn'"):
        curvature_operator("ggn", make_mlp(), F.cross_entropy, loader(x, y))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="second_order_mode"):
        DirectInfluence(make_mlp(), F.cross_entropy, 0.1, second_order_mode="ggn")  # type: ignore[arg-type]


def test_mode_accepted_by_value() -> None:
    model = CgInfluence(
        make_mlp(), F.cross_entropy, 0.1, second_order_mode="generalized_gauss_newton"
    )  # type: ignore[arg-type]
    assert model.second_order_mode is GGN


def test_inverse_harmonic_mean_rejects_ggn() -> None:
    with pytest.raises(ValueError, match="must be SecondOrderMode.GAUSS_NEWTON"):
        InverseHarmonicMeanInfluence(make_mlp(), F.cross_entropy, 0.1, second_order_mode=GGN)
