"""The inverse harmonic mean (DataInf) against its closed form with explicit inverses."""

from __future__ import annotations

import pytest

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx import InfluenceMode
from influx.torch import (
    BlockMode,
    DirectInfluence,
    InverseHarmonicMeanBatchOperation,
    InverseHarmonicMeanInfluence,
    InverseHarmonicMeanOperator,
    SecondOrderMode,
    TorchBatch,
    TorchGradientProvider,
)
from references import per_sample_grads

F = torch.nn.functional


@pytest.fixture(scope="module")
def setup() -> tuple:
    x, y = classification_data(n=61)
    net = make_mlp()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=30, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(net(x), y) + 1e-3 * sum((p**2).sum() for p in net.parameters())
        value.backward()
        return value

    opt.step(closure)
    return net, x, y


def _params(net: torch.nn.Module, names) -> dict:
    return {n: p for n, p in net.named_parameters() if n in names}


def closed_form(net, names, x, y, lam) -> torch.Tensor:
    r"""$\frac{1}{n}\sum_i (g_i g_i^\top + \lambda I)^{-1}$ with explicit inverses."""
    g = per_sample_grads(net, F.cross_entropy, _params(net, names), x, y)
    eye = torch.eye(g.shape[1])
    return torch.stack([torch.linalg.inv(torch.outer(gi, gi) + lam * eye) for gi in g]).mean(0)


def explicit_ihm_influences(net, names, x, y, x_test, y_test, lam) -> torch.Tensor:
    inverse = closed_form(net, names, x, y, lam)
    g_test = per_sample_grads(net, F.cross_entropy, _params(net, names), x_test, y_test)
    return g_test @ inverse @ per_sample_grads(net, F.cross_entropy, _params(net, names), x, y).T


@pytest.mark.parametrize("lam", [1e-3, 1e-1])
def test_matches_closed_form_for_any_batch_size(setup, lam) -> None:
    net, x, y = setup
    names = [n for n, _ in net.named_parameters()]
    expected = explicit_ihm_influences(net, names, x, y, x[:5], y[:5], lam)
    for batch_size in (61, 16, 7, 1):  # one batch, uneven last batch (61 = 8 * 7 + 5), ...
        model = InverseHarmonicMeanInfluence(net, F.cross_entropy, lam)
        values = model.fit(loader(x, y, batch_size)).influences(x[:5], y[:5], x, y)
        assert rel_err(values, expected) < 1e-10, batch_size


def test_operator_matches_closed_form(setup) -> None:
    net, x, y = setup
    names = [n for n, _ in net.named_parameters()]
    lam = 1e-2
    op = InverseHarmonicMeanOperator(net, F.cross_entropy, loader(x, y, 16), lam)
    expected = closed_form(net, names, x, y, lam)
    v = torch.randn(3, expected.shape[0])
    assert rel_err(op.apply(v), v @ expected) < 1e-10
    assert rel_err(op.apply(v[0]), expected @ v[0]) < 1e-10
    assert rel_err(op.to_dense(), expected) < 1e-10
    # one batch: the batch operation is the mean over its points
    batch_op = InverseHarmonicMeanBatchOperation(net, F.cross_entropy, lam)
    assert rel_err(batch_op.apply(TorchBatch(x, y), v), v @ expected) < 1e-10
    assert op.regularization == lam and op.diagnostics.method == "inverse_harmonic_mean"


def test_layer_wise_blocks_with_per_block_regularization(setup) -> None:
    net, x, y = setup
    lams = {"0": 1e-2, "2": 1e-1}
    model = InverseHarmonicMeanInfluence(net, F.cross_entropy, lams, BlockMode.LAYER_WISE)
    by_block = model.fit(loader(x, y, 16)).influences_by_block(x[:4], y[:4], x, y)
    for block, lam in lams.items():
        names = [f"{block}.weight", f"{block}.bias"]
        expected = explicit_ihm_influences(net, names, x, y, x[:4], y[:4], lam)
        assert rel_err(by_block[block], expected) < 1e-10
    total = model.influences(x[:4], y[:4], x, y)
    assert rel_err(total, by_block["0"] + by_block["2"]) < 1e-12
    assert [d.method for d in model.solver_diagnostics.values()] == ["inverse_harmonic_mean"] * 2


def test_with_regularization_and_perturbation(setup) -> None:
    net, x, y = setup
    data = loader(x, y, 16)
    model = InverseHarmonicMeanInfluence(net, F.cross_entropy, 0.1).fit(data)
    other = model.with_regularization(1e-2)
    fresh = InverseHarmonicMeanInfluence(net, F.cross_entropy, 1e-2).fit(data)
    assert (
        rel_err(other.influences(x[:3], y[:3], x, y), fresh.influences(x[:3], y[:3], x, y)) < 1e-12
    )
    assert model.regularization == 0.1
    # perturbation: the factors paired with the mixed derivatives of the training points
    factors = model.influence_factors(x[:3], y[:3])
    mixed = TorchGradientProvider(net, F.cross_entropy).flat_mixed_grads(TorchBatch(x, y))
    expected = torch.einsum("ip,jfp->ijf", factors, mixed)
    values = model.influences(x[:3], y[:3], x, y, mode=InfluenceMode.Perturbation)
    assert rel_err(values, expected) < 1e-12


def test_approaches_gauss_newton_inverse_for_large_regularization(setup) -> None:
    """DataInf's error against (G + λI)^{-1} vanishes as λ dominates |g|^2."""
    net, x, y = setup
    data = loader(x, y, 16)
    errors = []
    for lam in (1.0, 10.0, 100.0):
        expected = DirectInfluence(
            net, F.cross_entropy, lam, second_order_mode=SecondOrderMode.GAUSS_NEWTON
        ).fit(data)
        values = InverseHarmonicMeanInfluence(net, F.cross_entropy, lam).fit(data)
        errors.append(
            rel_err(values.influences(x[:5], y[:5], x, y), expected.influences(x[:5], y[:5], x, y))
        )
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_float32(setup) -> None:
    net, x, y = setup
    net32 = make_mlp()
    net32.load_state_dict(net.state_dict())
    net32 = net32.float()
    names = [n for n, _ in net.named_parameters()]
    expected = explicit_ihm_influences(net, names, x, y, x[:3], y[:3], 0.1)
    model = InverseHarmonicMeanInfluence(net32, F.cross_entropy, 0.1)
    values = model.fit(loader(x.float(), y, 16)).influences(x[:3].float(), y[:3], x.float(), y)
    assert values.dtype == torch.float32
    assert rel_err(values.double(), expected) < 1e-4


def test_errors(setup) -> None:
    net, x, y = setup
    loss = F.cross_entropy
    for bad in (None, 0.0):
        with pytest.raises(ValueError, match=rf"'regularization' must be positive.*got {bad}"):
            InverseHarmonicMeanInfluence(net, loss, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=rf"'regularization' must be positive.*got {bad}"):
            InverseHarmonicMeanOperator(net, loss, loader(x, y), bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=rf"'regularization' must be positive.*got {bad}"):
            InverseHarmonicMeanBatchOperation(net, loss, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'regularization' must be a non-negative number, got -1"):
        InverseHarmonicMeanInfluence(net, loss, -1.0)
    with pytest.raises(ValueError, match=r"'regularization' must be positive.*\{'2': None\}"):
        InverseHarmonicMeanInfluence(net, loss, {"0": 0.1, "2": None}, BlockMode.LAYER_WISE)
    with pytest.raises(
        ValueError, match="'second_order_mode' must be SecondOrderMode.GAUSS_NEWTON"
    ):
        InverseHarmonicMeanInfluence(net, loss, 0.1, second_order_mode=SecondOrderMode.HESSIAN)
    model = InverseHarmonicMeanInfluence(net, loss, 0.1)
    with pytest.raises(ValueError, match=r"'regularization' must be positive.*got 0"):
        model.with_regularization(0)
    op = InverseHarmonicMeanOperator(net, loss, loader(x, y), 0.1)
    with pytest.raises(ValueError, match=r"'regularization' must be positive.*got None"):
        op.with_regularization(None)
