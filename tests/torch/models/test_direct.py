"""DirectInfluence on non-linear models: explicit Hessians, batch sizes, blocks, regularization."""

from __future__ import annotations

from collections import OrderedDict

import pytest

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.torch import BlockMode, DirectInfluence, SecondOrderMode
from references import explicit_influences

F = torch.nn.functional


def test_logistic_regression_matches_explicit_hessian() -> None:
    x, y = classification_data(n=50, d_in=4, n_classes=2)
    net = torch.nn.Linear(4, 2)
    lam = 0.01
    model = DirectInfluence(net, F.cross_entropy, lam).fit(loader(x, y, 8))
    values = model.influences(x[:6], y[:6], x, y)
    expected = explicit_influences(
        net, F.cross_entropy, dict(net.named_parameters()), x, y, x[:6], y[:6], lam
    )
    assert rel_err(values, expected) < 1e-10


def test_mlp_matches_explicit_hessian() -> None:
    x, y = classification_data()
    net = make_mlp()
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y, 16))
    expected = explicit_influences(
        net, F.cross_entropy, dict(net.named_parameters()), x, y, x[:5], y[:5], 0.1
    )
    assert rel_err(model.influences(x[:5], y[:5], x, y), expected) < 1e-10


@pytest.mark.parametrize("mode", list(SecondOrderMode))
def test_independent_of_batch_size(mode: SecondOrderMode) -> None:
    x, y = classification_data(n=61)
    net = make_mlp()
    results = [
        DirectInfluence(net, F.cross_entropy, 0.05, second_order_mode=mode)
        .fit(loader(x, y, bs))
        .influences(x[:4], y[:4], x, y)
        for bs in (61, 7, 16, 1)  # single batch, uneven last batch (61 = 8*7 + 5), ...
    ]
    for other in results[1:]:
        assert rel_err(other, results[0]) < 1e-10


def test_influences_from_factors_equal_influences() -> None:
    x, y = classification_data()
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.1, BlockMode.LAYER_WISE)
    model.fit(loader(x, y))
    factors = model.influence_factors(x[:5], y[:5])
    assert factors.shape == (5, model.n_parameters)
    values = model.influences(x[:5], y[:5], x, y)
    assert rel_err(model.influences_from_factors(factors, x, y), values) < 1e-12
    by_block = model.influence_factors_by_block(x[:5], y[:5])
    from_blocks = model.influences_from_factors_by_block(by_block, x, y)
    assert rel_err(sum(from_blocks.values()), values) < 1e-12


@pytest.mark.parametrize("structure", [BlockMode.LAYER_WISE, BlockMode.PARAMETER_WISE])
def test_each_block_equals_restricted_direct_computation(structure: BlockMode) -> None:
    x, y = classification_data()
    net = make_mlp()
    lam = 0.1
    model = DirectInfluence(net, F.cross_entropy, lam, structure).fit(loader(x, y, 13))
    by_block = model.influences_by_block(x[:4], y[:4], x, y)
    params = dict(net.named_parameters())
    if structure is BlockMode.LAYER_WISE:
        expected_blocks = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    else:
        expected_blocks = {name: [name] for name in params}
    assert list(by_block) == list(expected_blocks)
    for block, names in expected_blocks.items():
        expected = explicit_influences(
            net, F.cross_entropy, {n: params[n] for n in names}, x, y, x[:4], y[:4], lam
        )
        assert by_block[block].shape == (4, 60)
        assert rel_err(by_block[block], expected) < 1e-10
    total = model.influences(x[:4], y[:4], x, y)
    assert rel_err(sum(by_block.values()), total) < 1e-12


def test_custom_block_structure_and_full_on_one_layer() -> None:
    x, y = classification_data(d_in=4)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    data = loader(x, y)
    full = DirectInfluence(net, F.cross_entropy, 0.1).fit(data).influences(x[:3], y[:3], x, y)
    layer = DirectInfluence(net, F.cross_entropy, 0.1, BlockMode.LAYER_WISE).fit(data)
    assert layer.block_names == ["0"]
    bare = DirectInfluence(net[0], F.cross_entropy, 0.1, BlockMode.LAYER_WISE)
    assert bare.block_names == ["model"]
    assert rel_err(layer.influences(x[:3], y[:3], x, y), full) < 1e-12
    custom = OrderedDict([("w", ["0.weight"]), ("b", ["0.bias"])])
    model = DirectInfluence(net, F.cross_entropy, {"w": 0.1, "b": 0.2}, custom).fit(data)
    assert list(model.influences_by_block(x[:3], y[:3], x, y)) == ["w", "b"]
    pw = DirectInfluence(
        net, F.cross_entropy, {"0.weight": 0.1, "0.bias": 0.2}, BlockMode.PARAMETER_WISE
    ).fit(data)
    assert rel_err(model.influences(x[:3], y[:3], x, y), pw.influences(x[:3], y[:3], x, y)) < 1e-12


def test_with_regularization_reuses_curvature_and_matches_refit() -> None:
    x, y = classification_data()
    net = make_mlp()
    data = loader(x, y)
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(data)
    other = model.with_regularization(0.5)
    refit = DirectInfluence(net, F.cross_entropy, 0.5).fit(data)
    assert (
        rel_err(other.influences(x[:3], y[:3], x, y), refit.influences(x[:3], y[:3], x, y)) < 1e-12
    )
    # the original is unchanged and the dense curvature was not recomputed
    assert model.regularization == 0.1
    old_op = model.block_mapper.composable_block_dict["model"].op
    new_op = other.block_mapper.composable_block_dict["model"].op
    assert new_op._base is old_op._base
    assert new_op.regularization == 0.5


def test_indefinite_hessian_without_regularization_uses_lu() -> None:
    x, y = classification_data()
    net = make_mlp()
    model = DirectInfluence(net, F.cross_entropy).fit(loader(x, y))
    op = model.block_mapper.composable_block_dict["model"].op
    # an untrained MLP has an indefinite Hessian: Cholesky fails, LU is used
    assert op.factorization in ("lu", "eigh")
    h = op.matrix
    g = model.influence_factors(x[:2], y[:2])
    gp = model.block_mapper.composable_block_dict["model"].gradient_provider
    from influx.torch import TorchBatch

    raw = gp.flat_grads(TorchBatch(x[:2], y[:2]))
    assert rel_err(g @ h, raw) < 1e-8


def test_solver_diagnostics_per_block() -> None:
    x, y = classification_data()
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.1, BlockMode.LAYER_WISE)
    assert list(model.solver_diagnostics.values()) == [None, None]
    model.fit(loader(x, y))
    diagnostics = model.solver_diagnostics
    assert list(diagnostics) == ["0", "2"]
    assert all(d is not None and d.converged for d in diagnostics.values())
    assert diagnostics["0"].method.startswith("direct/")


@pytest.mark.parametrize("structure", [BlockMode.FULL, BlockMode.LAYER_WISE])
def test_self_influences_equal_diagonal(structure: BlockMode) -> None:
    from influx import InfluenceMode

    x, y = classification_data()
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.1, structure).fit(loader(x, y))
    full = model.influences(x, y)
    assert rel_err(model.self_influences(x, y), torch.diagonal(full)) < 1e-12
    pert_full = model.influences(x[:6], y[:6], mode=InfluenceMode.Perturbation)
    pert_self = model.self_influences(x[:6], y[:6], mode=InfluenceMode.Perturbation)
    assert pert_self.shape == (6, 5)
    expected = torch.stack([pert_full[i, i] for i in range(6)])
    assert rel_err(pert_self, expected) < 1e-12
    by_block = model.self_influences_by_block(x, y)
    assert rel_err(sum(by_block.values()), torch.diagonal(full)) < 1e-12
