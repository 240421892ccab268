"""K-FAC and EK-FAC: factors, operator against dense Kronecker algebra, exact cases, accuracy."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from torch.func import grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx import InfluenceMode, NotFittedException
from influx.torch import (
    BlockMode,
    DirectInfluence,
    EkfacInfluence,
    KroneckerFactoredOperator,
    NotImplementedLayerRepresentationException,
    SecondOrderMode,
    TorchBatch,
    TorchGradientProvider,
)
from influx.torch.operator import GaussNewtonOperator
from references import exact_fisher

F = torch.nn.functional
GN = SecondOrderMode.GAUSS_NEWTON


def flat_to_matrix_index(m: int, d: int, weight: bool, bias: bool) -> torch.Tensor:
    """index[p] = position in the row-major [W | b] (m, k) layout of flat parameter p."""
    k = (d if weight else 0) + (1 if bias else 0)
    rows = torch.arange(m)
    parts = []
    if weight:
        parts.append((rows[:, None] * k + torch.arange(d)[None, :]).reshape(-1))
    if bias:
        parts.append(rows * k + k - 1)
    return torch.cat(parts)


def to_flat_order(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return matrix[index][:, index]


def output_grads(head, z, y) -> torch.Tensor:
    """Per-sample gradients of cross_entropy(head(z_i), y_i) with respect to z_i."""

    def one(zi, yi):
        return F.cross_entropy(head(zi.unsqueeze(0)), yi.unsqueeze(0))

    return vmap(grad(one))(z, y)


def dense_inverse(curvature: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.linalg.inv(curvature + lam * torch.eye(curvature.shape[0]))


# --------------------------------------------------------------------------------------------
# the operator against dense Kronecker algebra


@pytest.mark.parametrize("bias", [True, False])
def test_linear_operator_equals_dense_kronecker(bias: bool) -> None:
    x, y = classification_data(n=45, d_in=4, n_classes=3)
    net = torch.nn.Linear(4, 3, bias=bias)
    lam = 0.05
    model = EkfacInfluence(net, hessian_regularization=lam).fit(loader(x, y, 8))
    # independent factors: A = E[a a^T] with a 1 appended, G = E[delta delta^T]
    with torch.no_grad():
        delta = output_grads(torch.nn.Identity(), net(x), y)
    a = torch.cat([x, torch.ones(45, 1)], dim=1) if bias else x
    a_cov, g_cov = a.T @ a / 45, delta.T @ delta / 45
    factors = model.kronecker_factors["model"]
    assert rel_err(factors.input_covariance, a_cov) < 1e-12
    assert rel_err(factors.output_grad_covariance, g_cov) < 1e-12
    index = flat_to_matrix_index(3, 4, True, bias)
    expected = dense_inverse(to_flat_order(torch.kron(g_cov, a_cov), index), lam)
    op = model.block_mapper.composable_block_dict["model"].op
    assert isinstance(op, KroneckerFactoredOperator)
    dense = op.apply(torch.eye(op.input_size))
    assert float((dense - expected).abs().max()) < 1e-10 * float(expected.abs().max())
    assert op.diagnostics is not None and op.diagnostics.method == "kfac"
    # apply_to_dict agrees with apply
    v = torch.randn(5, op.input_size)
    as_dict = {"weight": v[:, :12].reshape(5, 3, 4)}
    if bias:
        as_dict["bias"] = v[:, 12:]
    applied = op.apply_to_dict(as_dict)
    assert rel_err(torch.cat([t.reshape(5, -1) for t in applied.values()], 1), op.apply(v)) < 1e-14


def conv_setup():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 2, 5, 5, generator=gen)
    y = torch.randint(0, 3, (30,), generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 3 * 3, 3),
    )
    return net, x, y


@pytest.mark.parametrize("update_diagonal", [False, True])
def test_conv2d_operator_equals_dense_kronecker(update_diagonal: bool) -> None:
    net, x, y = conv_setup()
    conv, head = net[0], net[1:]
    lam = 0.02
    model = EkfacInfluence(net, update_diagonal, lam, layers=["0"]).fit(loader(x, y, 7))
    assert model.block_names == ["0"]
    # independent factors from unfolded patches and per-sample output gradients
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # (N, L, 18)
    patches = torch.cat([patches, torch.ones(30, patches.shape[1], 1)], dim=2)
    with torch.no_grad():
        delta = output_grads(head, conv(x), y).reshape(30, 3, -1).transpose(1, 2)  # (N, L, 3)
    # the patch layout reproduces the true per-sample gradients of [W | b]
    per_sample = torch.einsum("ntm,ntk->nmk", delta, patches)
    params = {k: v for k, v in net.named_parameters() if k.startswith("0.")}
    true_grads = TorchGradientProvider(net, F.cross_entropy, params).flat_grads(TorchBatch(x, y))
    index = flat_to_matrix_index(3, 18, True, True)
    assert rel_err(per_sample.reshape(30, -1)[:, index], true_grads) < 1e-12
    a2, d2 = patches.reshape(-1, 19), delta.reshape(-1, 3)
    a_cov, g_cov = a2.T @ a2 / a2.shape[0], d2.T @ d2 / 30
    factors = model.kronecker_factors["0"]
    assert rel_err(factors.input_covariance, a_cov) < 1e-12
    assert rel_err(factors.output_grad_covariance, g_cov) < 1e-12
    if update_diagonal:
        # EK-FAC: eigenvalues are the diagonal of Q^T F Q for the exact Fisher F
        evals_a, qa = torch.linalg.eigh(a_cov)
        evals_g, qg = torch.linalg.eigh(g_cov)
        basis = torch.kron(qg, qa)
        fisher = exact_fisher(net, F.cross_entropy, params, x, y)
        inverse_index = torch.argsort(index)
        fisher_matrix_layout = fisher[inverse_index][:, inverse_index]
        s = torch.diagonal(basis.T @ fisher_matrix_layout @ basis)
        curvature = basis @ torch.diag(s) @ basis.T
    else:
        curvature = torch.kron(g_cov, a_cov)
    expected = dense_inverse(to_flat_order(curvature, index), lam)
    op = model.block_mapper.composable_block_dict["0"].op
    dense = op.apply(torch.eye(op.input_size))
    assert float((dense - expected).abs().max()) < 1e-10 * float(expected.abs().max())


def test_no_bias_equals_bias_frozen_at_zero() -> None:
    x, y = classification_data(n=40, d_in=5, n_classes=3)
    torch.manual_seed(1)
    without = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.Tanh())
    without.append(torch.nn.Linear(4, 3))
    frozen = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        frozen[0].weight.copy_(without[0].weight)
        frozen[0].bias.zero_()
        frozen[2].load_state_dict(without[2].state_dict())
    frozen[0].bias.requires_grad_(False)
    values = [
        EkfacInfluence(net, True, 0.01).fit(loader(x, y)).influences(x[:4], y[:4], x, y)
        for net in (without, frozen)
    ]
    assert rel_err(values[1], values[0]) < 1e-12


# --------------------------------------------------------------------------------------------
# exactness and accuracy


def separable_binary_task(bias: bool):
    """A Linear layer on a binary task whose empirical Fisher is diagonal in the Kronecker
    eigenbasis: axis-aligned inputs with distinct scales, in pairs (x, y) and (-x, 1 - y) so
    that, with a zero bias, the input-bias cross terms cancel."""
    scales = torch.tensor([1.0, 2.0, 3.0, 0.5])
    gen = torch.Generator().manual_seed(5)
    n_half, d = 24, 4
    axis = torch.arange(n_half) % d
    sign = torch.where(torch.rand(n_half, generator=gen) < 0.5, -1.0, 1.0)
    x_half = torch.zeros(n_half, d)
    x_half[torch.arange(n_half), axis] = sign * scales[axis] * (1 + 0.3 * (axis == 1))
    y_half = torch.randint(0, 2, (n_half,), generator=gen)
    x = torch.cat([x_half, -x_half])
    y = torch.cat([y_half, 1 - y_half])
    net = torch.nn.Linear(d, 2, bias=bias)
    if bias:
        with torch.no_grad():
            net.bias.zero_()
    return net, x, y


@pytest.mark.parametrize("bias", [False, True])
def test_ekfac_equals_direct_gauss_newton_where_kronecker_is_exact(bias: bool) -> None:
    net, x, y = separable_binary_task(bias)
    lam = 0.01
    data = loader(x, y, 10)
    ekfac = EkfacInfluence(net, update_diagonal=True, hessian_regularization=lam).fit(data)
    direct = DirectInfluence(net, F.cross_entropy, lam, second_order_mode=GN).fit(data)
    expected = direct.influences(x[:9], y[:9], x, y)
    assert rel_err(ekfac.influences(x[:9], y[:9], x, y), expected) < 1e-8
    # K-FAC alone is not exact here: the refit matters
    kfac = EkfacInfluence(net, update_diagonal=False, hessian_regularization=lam).fit(data)
    assert rel_err(kfac.influences(x[:9], y[:9], x, y), expected) > 1e-3


def test_ekfac_closer_to_empirical_fisher_than_kfac() -> None:
    x, y = classification_data(n=80)
    net = make_mlp()
    data = loader(x, y, 16)
    errors = {}
    for update in (False, True):
        model = EkfacInfluence(net, update, 0.0).fit(data)
        for name, block in model.block_mapper.composable_block_dict.items():
            params = model._blocks[name]
            fisher = GaussNewtonOperator(net, F.cross_entropy, data, params).to_dense()
            op = block.op
            assert isinstance(op, KroneckerFactoredOperator)
            errors[(name, update)] = float(torch.linalg.norm(op.curvature_matrix() - fisher))
    for name in ("0", "2"):
        assert errors[(name, True)] < errors[(name, False)]


def test_mse_factors_closed_form(linreg) -> None:
    """MSE (mean over samples and outputs): G = E[delta delta^T] with delta = (2/m) r."""
    model = EkfacInfluence(linreg.model, True, 0.1, loss=F.mse_loss)
    model.fit(loader(linreg.x, linreg.y, 9))
    r = linreg.residual(linreg.x, linreg.y)
    delta = 2.0 / linreg.m * r
    a = torch.cat([linreg.x, torch.ones(len(linreg.x), 1)], dim=1)
    factors = model.kronecker_factors["model"]
    assert rel_err(factors.output_grad_covariance, delta.T @ delta / len(r)) < 1e-12
    assert rel_err(factors.input_covariance, a.T @ a / len(r)) < 1e-12
    # EK-FAC eigenvalues: diagonal of Q^T F Q with the closed-form empirical Fisher
    basis = model.eigenbases["model"]
    q = torch.kron(basis.output_eigenvectors, basis.input_eigenvectors)
    index = flat_to_matrix_index(linreg.m, linreg.d, True, True)
    inverse_index = torch.argsort(index)
    fisher = linreg.gauss_newton()[inverse_index][:, inverse_index]
    expected = torch.diagonal(q.T @ fisher @ q).reshape(linreg.m, linreg.d + 1)
    assert rel_err(model.eigenvalues["model"], expected) < 1e-12


def assert_refit_is_rotated_fisher(net, x, y, layer: str, weight: bool, bias: bool) -> None:
    """EK-FAC eigenvalues = diag(Q^T F Q) with F the exact empirical Fisher of the layer: this
    checks the input expansion (patches, positions, bias column) against torch.func."""
    model = EkfacInfluence(net, True, 0.1, layers=[layer]).fit(loader(x, y, 6))
    params = {k: v for k, v in net.named_parameters() if k.startswith(layer + ".")}
    params = {k: v for k, v in params.items() if v.requires_grad}
    fisher = exact_fisher(net, F.cross_entropy, params, x, y)
    basis = model.eigenbases[layer]
    q = torch.kron(basis.output_eigenvectors, basis.input_eigenvectors)
    module = dict(net.named_modules())[layer]
    m, d = module.weight.shape[0], module.weight[0].numel()
    inverse_index = torch.argsort(flat_to_matrix_index(m, d, weight, bias))
    expected = torch.diagonal(q.T @ fisher[inverse_index][:, inverse_index] @ q)
    assert rel_err(model.eigenvalues[layer].reshape(-1), expected) < 1e-12


def test_sequence_inputs_refit_is_diagonal_of_rotated_fisher() -> None:
    """A Linear layer applied at every position of a sequence (N, T, d)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(25, 4, 3, generator=gen)
    y = torch.randint(0, 2, (25,), generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(20, 2)
    )
    assert_refit_is_rotated_fisher(net, x, y, "0", True, True)
    net[0].weight.requires_grad_(False)  # bias only
    assert_refit_is_rotated_fisher(net, x, y, "0", False, True)


@pytest.mark.parametrize(
    "conv",
    [
        dict(padding="same", padding_mode="reflect"),
        dict(padding=0, dilation=2),
        dict(padding=2, stride=(2, 1), bias=False),
    ],
)
def test_conv2d_variants_refit_is_diagonal_of_rotated_fisher(conv: dict) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 2, 6, 6, generator=gen)
    y = torch.randint(0, 3, (20,), generator=gen)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, kernel_size=3, **conv),
        torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 3),
    )
    assert_refit_is_rotated_fisher(net, x, y, "0", True, conv.get("bias", True))


@pytest.mark.slow
def test_digits_mlp_ekfac_beats_identity(deterministic: None) -> None:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.data / 16.0)
    y_all = torch.tensor(digits.target)
    x, y = x_all[:400], y_all[:400]
    x_test, y_test = x_all[1500:1520], y_all[1500:1520]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(120):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    # The model learned the digits (seeds 0-5: held-out accuracy 0.92-0.93, EK-FAC Pearson
    # 0.974-0.986 against the exact Gauss-Newton influences).
    with torch.no_grad():
        accuracy = float((net(x_all[1000:]).argmax(1) == y_all[1000:]).double().mean())
    assert accuracy > 0.9, accuracy
    lam = 0.01
    data = loader(x, y, 100)
    exact = DirectInfluence(net, F.cross_entropy, lam, second_order_mode=GN).fit(data)
    reference = exact.influences(x_test, y_test, x, y).flatten().numpy()
    grads = TorchGradientProvider(net, F.cross_entropy)
    identity = grads.flat_grads(TorchBatch(x_test, y_test)) @ grads.flat_grads(TorchBatch(x, y)).T
    candidates = {
        "ekfac": EkfacInfluence(net, True, lam).fit(data).influences(x_test, y_test, x, y),
        "kfac": EkfacInfluence(net, False, lam).fit(data).influences(x_test, y_test, x, y),
        "identity": identity,
    }
    figures = {
        name: (
            float(pearsonr(v.flatten().numpy(), reference)[0]),
            float(spearmanr(v.flatten().numpy(), reference)[0]),
        )
        for name, v in candidates.items()
    }
    print("digits MLP, lambda=0.01, (pearson, spearman) vs exact Gauss-Newton:", figures)
    assert figures["ekfac"][0] > figures["identity"][0]
    assert figures["ekfac"][1] > figures["identity"][1]
    assert figures["ekfac"][0] > 0.9


# --------------------------------------------------------------------------------------------
# composition: by layer, factors, shapes, dtypes, batch sizes, regularization


@pytest.fixture
def fitted_mlp():
    x, y = classification_data(n=30)
    model = EkfacInfluence(make_mlp(), update_diagonal=True, hessian_regularization=0.05)
    return model.fit(loader(x, y, 8)), x, y


@pytest.mark.parametrize("n_test", [4, 45])
def test_by_layer_factors_and_shapes(fitted_mlp, n_test: int) -> None:
    model, x, y = fitted_mlp
    x_test, y_test = classification_data(n=n_test, seed=7)
    values = model.influences(x_test, y_test, x, y)
    assert values.shape == (n_test, 30)
    by_layer = model.influences_by_layer(x_test, y_test, x, y)
    assert list(by_layer) == ["0", "2"]
    assert rel_err(sum(by_layer.values()), values) < 1e-12
    factors = model.influence_factors(x_test, y_test)
    assert factors.shape == (n_test, model.n_parameters)
    assert rel_err(model.influences_from_factors(factors, x, y), values) < 1e-12
    factors_by_layer = model.influence_factors_by_layer(x_test, y_test)
    from_factors = model.influences_from_factors_by_layer(factors_by_layer, x, y)
    for name in by_layer:
        assert rel_err(from_factors[name], by_layer[name]) < 1e-12
    perturbation = model.influences(
        x_test[:2], y_test[:2], x[:4], y[:4], InfluenceMode.Perturbation
    )
    assert perturbation.shape == (2, 4, 5)
    by_layer_perturbation = model.influences_by_layer(
        x_test[:2], y_test[:2], x[:4], y[:4], InfluenceMode.Perturbation
    )
    assert rel_err(sum(by_layer_perturbation.values()), perturbation) < 1e-12
    symmetric = model.influences(x_test[:3], y_test[:3])
    assert symmetric.shape == (3, 3) and rel_err(symmetric, symmetric.T) < 1e-12


def test_float32_model_matches_float64() -> None:
    x, y = classification_data(n=40)
    net64 = make_mlp()
    net32 = make_mlp().float()
    values64 = EkfacInfluence(net64, True, 0.05).fit(loader(x, y)).influences(x[:5], y[:5], x, y)
    model32 = EkfacInfluence(net32, True, 0.05).fit(loader(x.float(), y))
    values32 = model32.influences(x[:5].float(), y[:5], x.float(), y)
    assert values32.dtype == torch.float32
    assert rel_err(values32.double(), values64) < 1e-4


@pytest.mark.parametrize("update_diagonal", [False, True])
def test_independent_of_batch_size(update_diagonal: bool) -> None:
    net, x, y = conv_setup()
    results = [
        EkfacInfluence(net, update_diagonal, 0.01)
        .fit(loader(x, y, bs))
        .influences(x[:3], y[:3], x, y)
        for bs in (30, 7, 4)
    ]
    for other in results[1:]:
        assert rel_err(other, results[0]) < 1e-10


def test_refit_from_cache_equals_second_pass() -> None:
    net, x, y = conv_setup()
    data = loader(x, y, 7)
    cached = EkfacInfluence(net, True, 0.01).fit(data)
    tiny = EkfacInfluence(net, True, 0.01, max_cache_mb=0.01).fit(data)  # overflows midway
    two_passes = EkfacInfluence(net, True, 0.01, max_cache_mb=0).fit(data)
    for other in (tiny, two_passes):
        for name in cached.eigenvalues:
            assert rel_err(other.eigenvalues[name], cached.eigenvalues[name]) < 1e-12
    with pytest.raises(ValueError, match="'max_cache_mb' must be >= 0, got -1"):
        EkfacInfluence(net, max_cache_mb=-1)


def test_with_regularization_and_explore(fitted_mlp) -> None:
    model, x, y = fitted_mlp
    x_full, y_full = x, y
    refit = EkfacInfluence(model.model, True, 0.3).fit(loader(x_full, y_full, 8))
    changed = model.with_regularization(0.3)
    assert changed.hessian_regularization == 0.3 and model.hessian_regularization == 0.05
    for name, factors in model.kronecker_factors.items():  # reused, not refitted
        assert changed.kronecker_factors[name] is factors
    assert rel_err(changed.influences(x[:4], y[:4], x, y), refit.influences(x[:4], y[:4], x, y)) < (
        1e-12
    )
    explored = model.explore_hessian_regularization(x[:6], y[:6], [0.05, 0.3])
    for lam, target in ((0.05, model), (0.3, changed)):
        expected = target.influences_by_layer(x[:6], y[:6])
        for name in expected:
            assert rel_err(explored[lam][name], expected[name]) < 1e-12
    by_layer = model.with_regularization({"0": 0.1, "2": None})
    assert by_layer.solver_diagnostics["0"].details["regularization"] == 0.1
    assert by_layer.solver_diagnostics["2"].details["regularization"] is None


def test_regularization_alias_and_loss_keyword() -> None:
    x, y = classification_data(n=30)
    net = make_mlp()
    a = EkfacInfluence(net, True, hessian_regularization=0.1).fit(loader(x, y))
    b = EkfacInfluence(net, True, regularization=0.1, loss=F.cross_entropy).fit(loader(x, y))
    assert rel_err(b.influences(x[:3], y[:3], x, y), a.influences(x[:3], y[:3], x, y)) < 1e-14
    assert a.solver_diagnostics["0"].method == "ekfac"


def test_sampled_fisher_matches_expected_output_covariance() -> None:
    """With labels drawn from the model, G converges to E_x[diag(p) - p p^T]."""
    x, y = classification_data(n=20, d_in=3, n_classes=3)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3)
    repeats = 400
    data = DataLoader(TensorDataset(x.repeat(repeats, 1), y.repeat(repeats)), batch_size=500)
    model = EkfacInfluence(net, fisher="sampled", seed=0, hessian_regularization=0.1).fit(data)
    with torch.no_grad():
        p = torch.softmax(net(x), dim=1)
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert rel_err(model.kronecker_factors["model"].output_grad_covariance, expected) < 0.03
    again = EkfacInfluence(net, fisher="sampled", seed=0, hessian_regularization=0.1).fit(data)
    assert torch.equal(
        again.kronecker_factors["model"].output_grad_covariance,
        model.kronecker_factors["model"].output_grad_covariance,
    )


def test_matches_direct_layer_wise_gauss_newton_on_mlp_at_large_lambda_only_roughly() -> None:
    """Sanity: EK-FAC is an approximation of the layer-wise Gauss-Newton influences."""
    x, y = classification_data(n=60)
    net = make_mlp()
    data = loader(x, y)
    direct = DirectInfluence(net, F.cross_entropy, 0.01, BlockMode.LAYER_WISE, GN).fit(data)
    ekfac = EkfacInfluence(net, True, 0.01).fit(data)
    a = ekfac.influences(x[:5], y[:5], x, y).flatten()
    b = direct.influences(x[:5], y[:5], x, y).flatten()
    assert float(np.corrcoef(a.numpy(), b.numpy())[0, 1]) > 0.9


# --------------------------------------------------------------------------------------------
# errors


def test_unsupported_layer_is_named() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    with pytest.raises(
        NotImplementedLayerRepresentationException, match=r"Layer '1' \(LayerNorm\)"
    ):
        EkfacInfluence(net, other_layers="error")
    assert EkfacInfluence(net).block_names == ["0", "2"]  # other_layers="freeze"
    net[1].requires_grad_(False)
    assert EkfacInfluence(net).block_names == ["0", "2"]
    net[1].requires_grad_(True)
    assert EkfacInfluence(net, layers=["0", "2"]).block_names == ["0", "2"]
    grouped = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(NotImplementedLayerRepresentationException, match="groups=2"):
        EkfacInfluence(grouped)  # nothing to factor
    with pytest.raises(
        ValueError, match=r"'other_layers' must be one of \['freeze', 'error'\], got 'drop'"
    ):
        EkfacInfluence(net, other_layers="drop")


def test_bad_arguments() -> None:
    net = make_mlp()
    with pytest.raises(ValueError, match=r"'layers' names unknown modules \['5'\]"):
        EkfacInfluence(net, layers=["5"])
    with pytest.raises(ValueError, match="'layers': module '1' has no trainable parameters"):
        EkfacInfluence(net, layers=["1"])
    with pytest.raises(TypeError, match="'layers' must be a sequence"):
        EkfacInfluence(net, layers="0")
    with pytest.raises(ValueError, match="'fisher' must be one of.*'true'"):
        EkfacInfluence(net, fisher="true")
    with pytest.raises(ValueError, match="'fisher': 'sampled'.*cross-entropy.*mse_loss"):
        EkfacInfluence(net, fisher="sampled", loss=F.mse_loss)
    with pytest.raises(ValueError, match="'hessian_regularization' and 'regularization' are"):
        EkfacInfluence(net, hessian_regularization=0.1, regularization=0.2)
    with pytest.raises(ValueError, match="'regularization' must be a non-negative number"):
        EkfacInfluence(net, hessian_regularization=-1.0)
    with pytest.raises(ValueError, match=r"unknown blocks \['fc'\]"):
        EkfacInfluence(net, hessian_regularization={"fc": 0.1})
    with pytest.raises(TypeError, match="'model' must be a torch.nn.Module"):
        EkfacInfluence("net")  # type: ignore[arg-type]
    x, y = classification_data(n=10)
    with pytest.raises(NotFittedException):
        EkfacInfluence(net).influences(x, y)
    with pytest.raises(NotFittedException):
        EkfacInfluence(net).explore_hessian_regularization(x, y, [0.1])
    fitted = EkfacInfluence(net, hessian_regularization=0.1).fit(loader(x, y))
    with pytest.raises(ValueError, match="'regularization_values' must be a non-negative"):
        fitted.explore_hessian_regularization(x, y, [0.1, -0.5])
    with pytest.raises(ValueError, match="'data' yielded no batches"):
        EkfacInfluence(net).fit([])


def test_nan_is_an_error_naming_the_layer() -> None:
    x, y = classification_data(n=10)
    net = make_mlp()
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in its parameters \['2.weight'\]"):
        EkfacInfluence(net, hessian_regularization=0.1).fit(loader(x, y))


def test_operator_arguments() -> None:
    q = torch.eye(3)
    with pytest.raises(ValueError, match=r"'eigenvalues' must have shape \(3, 3\)"):
        KroneckerFactoredOperator(q, q, torch.ones(2, 3), 0.1, "w", (3, 3))
    with pytest.raises(ValueError, match="'weight_shape'"):
        KroneckerFactoredOperator(q, q, torch.ones(3, 3), 0.1, "w", (3, 5), "b")
    with pytest.raises(ValueError, match="'regularization' must be a non-negative"):
        KroneckerFactoredOperator(q, q, torch.ones(3, 3), -0.1, "w", (3, 3))


def test_zero_regularization_uses_pseudo_inverse(caplog) -> None:
    """Two-class cross-entropy: G is singular, so lambda = 0 needs the pseudo-inverse."""
    net, x, y = separable_binary_task(bias=False)
    model = EkfacInfluence(net, hessian_regularization=None).fit(loader(x, y))
    assert "zero up to rounding" in caplog.text
    values = model.influences(x[:3], y[:3], x, y)
    assert torch.isfinite(values).all()
    assert model.solver_diagnostics["model"].details["n_zero_inverse"] > 0


def test_ordered_dict_keys_of_factors(fitted_mlp) -> None:
    model, x, y = fitted_mlp
    factors = model.influence_factors_by_layer(x[:2], y[:2])
    assert isinstance(factors, OrderedDict) and list(factors) == ["0", "2"]
    with pytest.raises(ValueError, match="must be keyed by the blocks"):
        model.influences_from_factors_by_layer(OrderedDict([("2", factors["2"])]), x, y)


def test_sequential_calculator_matches_influences() -> None:
    calculator = pytest.importorskip("influx.calculator")
    from influx.torch.util import NestedTorchCatAggregator  # type: ignore[attr-defined]

    net, x, y = conv_setup()
    model = EkfacInfluence(net, True, 0.01).fit(loader(x, y, 7))
    lazy = calculator.SequentialInfluenceCalculator(model).influences(
        loader(x[:5], y[:5], 2), loader(x, y, 8)
    )
    values = lazy.compute(aggregator=NestedTorchCatAggregator())
    assert rel_err(values, model.influences(x[:5], y[:5], x, y)) < 1e-12


class _CountingLoader:
    """A data loader that counts the batches drawn from it."""

    def __init__(self, loader) -> None:  # type: ignore[no-untyped-def]
        self.loader, self.batches = loader, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.loader:
            self.batches += 1
            yield batch


def test_sampled_fisher_refit_draws_fresh_labels() -> None:
    x, y = classification_data()
    counts = {}
    for fisher in ("empirical", "sampled"):
        data = _CountingLoader(loader(x, y))
        EkfacInfluence(make_mlp(), True, 0.1, fisher=fisher, seed=0).fit(data)  # type: ignore[arg-type]
        counts[fisher] = data.batches
    # the sampled refit makes a second pass over the data; the empirical one reuses the cache
    assert counts["sampled"] == counts["empirical"] + len(loader(x, y))


@pytest.mark.parametrize(
    "positions, k, m",
    [(2, 40, 8), (64, 6, 4)],  # few positions, wide inputs: the signals are rotated; else V_i
)
def test_rotated_gradients_equal_the_rotated_per_sample_gradients(
    positions: int, k: int, m: int
) -> None:
    from influx.torch.kfac.contraction import rotated_gradients

    generator = torch.Generator().manual_seed(5)
    qa = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))[0]
    qg = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))[0]
    inputs = torch.randn(3, positions, k, generator=generator, dtype=torch.float64)
    output_grads = torch.randn(3, positions, m, generator=generator, dtype=torch.float64)
    grads = sum(
        torch.outer(output_grads[0, t], inputs[0, t]) for t in range(positions)
    )  # the first sample's gradient, position by position
    result = rotated_gradients(inputs, output_grads, qa, qg)
    assert result.shape == (3, m, k)
    torch.testing.assert_close(result[0], qg.T @ grads @ qa, rtol=1e-12, atol=1e-12)
