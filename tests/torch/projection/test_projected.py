"""ProjectedInfluence: exactness at full dimension, the Kronecker projection against explicit
per-sample gradients, seeds, persistence, the gradient store and the input checks."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest
from torch.func import functional_call, grad, vmap

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.calculator import SequentialInfluenceCalculator
from influx.torch import (
    BlockMode,
    DirectInfluence,
    InfluenceMode,
    NestedTorchCatAggregator,
    ProjectedInfluence,
    SecondOrderMode,
)
from influx.torch.data.batches import TorchBatch
from influx.torch.projection.gradients import ProjectedGradientProvider
from influx.torch.projection.projections import BlockProjection, allocate_dimensions
from influx.torch.workflows.gradient_store import GradientStore

F = torch.nn.functional
GN, GGN = SecondOrderMode.GAUSS_NEWTON, SecondOrderMode.GENERALIZED_GAUSS_NEWTON
LAMBDA = 0.1


def make_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 5, 5)),
        torch.nn.Conv2d(1, 2, kernel_size=3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(2, 2, kernel_size=2, stride=2),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )


def _problem(kind: str) -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    if kind == "mlp":
        x, y = classification_data(40)
        return make_mlp(), x, y
    x, y = classification_data(40, d_in=25)
    return make_cnn(), x, y


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", [GN, GGN])
@pytest.mark.parametrize("projection", ["kronecker", "gaussian"])
def test_full_dimension_orthogonal_projection_equals_direct(
    kind: str, mode: SecondOrderMode, projection: str
) -> None:
    net, x, y = _problem(kind)
    data = loader(x, y)
    direct = DirectInfluence(net, F.cross_entropy, LAMBDA, second_order_mode=mode).fit(data)
    projected = ProjectedInfluence(
        net, F.cross_entropy, 10_000, projection, mode, LAMBDA, orthogonal=True
    ).fit(data)
    assert projected.factor_size == direct.n_parameters
    expected = direct.influences(x[:6], y[:6], x, y)
    assert rel_err(projected.influences(x[:6], y[:6], x, y), expected) < 1e-8
    assert rel_err(projected.self_influences(x, y), direct.self_influences(x, y)) < 1e-8


def test_full_dimension_equals_direct_by_layer_and_in_perturbation_mode() -> None:
    net, x, y = _problem("mlp")
    data = loader(x, y)
    layers = BlockMode.LAYER_WISE
    direct = DirectInfluence(net, F.cross_entropy, LAMBDA, layers, GN).fit(data)
    projected = ProjectedInfluence(
        net, F.cross_entropy, 100, regularization=LAMBDA, block_structure=layers, orthogonal=True
    ).fit(data)
    assert projected.projected_sizes == {"0": 36, "2": 21}
    for mode in InfluenceMode:
        expected = direct.influences(x[:3], y[:3], x[:7], y[:7], mode=mode)
        assert rel_err(projected.influences(x[:3], y[:3], x[:7], y[:7], mode=mode), expected) < 1e-8
    factors = projected.influence_factors(x[:3], y[:3])
    assert factors.shape == (3, 57)
    from_factors = projected.influences_from_factors(factors, x, y)
    assert rel_err(from_factors, direct.influences(x[:3], y[:3], x, y)) < 1e-8


def test_accuracy_grows_with_the_projected_dimension() -> None:
    net, x, y = _problem("mlp")
    data = loader(x, y)
    exact = DirectInfluence(net, F.cross_entropy, LAMBDA, second_order_mode=GN).fit(data)
    expected = exact.influences(x[:8], y[:8], x, y).flatten()
    errors = []
    for k in (8, 24, 57):
        model = ProjectedInfluence(net, F.cross_entropy, k, "gaussian", regularization=LAMBDA)
        errors.append(rel_err(model.fit(data).influences(x[:8], y[:8], x, y).flatten(), expected))
    assert errors[0] > errors[1] > errors[2]


# ------------------------------------------------------------------ the Kronecker projection


def _explicit_per_sample_grads(
    net: torch.nn.Module, loss: Callable, x: torch.Tensor, y: torch.Tensor
) -> Dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in net.named_parameters()}

    def single(p: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(net, p, (xi[None],)), yi[None])

    return vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)  # type: ignore[no-any-return]


class _Sequence(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).mean(dim=1)  # (N, T, 4) -> (N, 3)


LAYER_CASES: Dict[str, Callable[[], Tuple[torch.nn.Module, torch.Tensor, torch.Tensor, Any]]] = {
    "linear": lambda: (torch.nn.Linear(5, 4), torch.randn(6, 5), torch.randn(6, 4), F.mse_loss),
    "linear_no_bias": lambda: (
        torch.nn.Linear(5, 4, bias=False),
        torch.randn(6, 5),
        torch.randn(6, 4),
        F.mse_loss,
    ),
    "sequence": lambda: (
        _Sequence(),
        torch.randn(6, 7, 4),
        torch.randint(0, 3, (6,)),
        F.cross_entropy,
    ),
    "conv2d": lambda: (
        torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1), torch.nn.Flatten()
        ),
        torch.randn(6, 2, 5, 5),
        torch.randn(6, 27),
        F.mse_loss,
    ),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_kronecker_projection_equals_projecting_the_explicit_gradient(case: str) -> None:
    net, x, y, loss = LAYER_CASES[case]()
    params = dict(net.named_parameters())
    projection = BlockProjection(net, params, 6, "kronecker", seed=3, block_name="model")
    (layer,) = projection.layers.values()
    provider = ProjectedGradientProvider(net, loss, params, projection, "model")
    projected = provider.flat_grads(TorchBatch(x, y))
    # the explicit per-sample gradient [G_W | g_b] projected by the Kronecker product
    explicit = _explicit_per_sample_grads(net, loss, x, y)
    spec = layer.spec
    columns = [explicit[spec.weight_name].reshape(len(x), spec.out_dim, -1)]  # type: ignore[index]
    if spec.bias_name is not None:
        columns.append(explicit[spec.bias_name].unsqueeze(-1))
    matrix = torch.cat(columns, dim=-1).flatten(1)
    kron = torch.kron(layer.p_out, layer.p_in)
    assert projected.shape == (6, kron.shape[0])
    assert torch.allclose(projected, matrix @ kron.T, rtol=1e-10, atol=1e-12)
    flat = torch.cat([explicit[n].flatten(1) for n in params], dim=1)
    assert torch.allclose(projection.project_flat(flat), projected, rtol=1e-10, atol=1e-12)


def test_dimensions_are_shared_in_equal_parts_up_to_each_capacity() -> None:
    assert allocate_dimensions([100, 10, 100], 90) == [40, 10, 40]
    assert allocate_dimensions([5, 7], 100) == [5, 7]
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    projection = BlockProjection(net, dict(net.named_parameters()), 16, "kronecker", 0, "model")
    assert [(p.p_out.shape[0], p.p_in.shape[0]) for p in projection.layers.values()] == [
        (2, 4),  # a share of 8 each: 2 x 4 rather than 1 x 8
        (2, 4),
    ]


def test_projection_mixes_kronecker_layers_and_dense_parameters() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    x, y = classification_data(30, d_in=4)
    data = loader(x, y)
    direct = DirectInfluence(net, F.cross_entropy, LAMBDA, second_order_mode=GN).fit(data)
    model = ProjectedInfluence(net, F.cross_entropy, 1000, regularization=LAMBDA, orthogonal=True)
    model.fit(data)
    block = model.block_mapper.composable_block_dict["model"].gradient_provider
    assert block.projection.dense_names == ["1.weight", "1.bias"]  # type: ignore[attr-defined]
    expected = direct.influences(x[:4], y[:4], x, y)
    assert rel_err(model.influences(x[:4], y[:4], x, y), expected) < 1e-8


@pytest.mark.parametrize("projection", ["kronecker", "gaussian", "rademacher"])
def test_same_seed_bit_identical_other_seed_different(projection: str) -> None:
    net, x, y = _problem("cnn")
    data = loader(x, y)

    def run(seed: int) -> torch.Tensor:
        model = ProjectedInfluence(net, F.cross_entropy, 20, projection, seed=seed)
        return model.fit(data).influences(x[:3], y[:3], x[:9], y[:9])

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


# ------------------------------------------------------------------------------ persistence


def test_save_and_load_are_bit_identical(tmp_path: Path) -> None:
    net, x, y = _problem("cnn")
    data = loader(x, y)

    def make() -> ProjectedInfluence:
        return ProjectedInfluence(net, F.cross_entropy, 24, regularization=LAMBDA, seed=5)

    model = make().fit(data)
    path = model.save(tmp_path / "projected.fit")
    loaded = make().load_fit(path)
    assert torch.equal(loaded.influences(x[:4], y[:4], x, y), model.influences(x[:4], y[:4], x, y))
    other_seed = ProjectedInfluence(net, F.cross_entropy, 24, regularization=LAMBDA, seed=6)
    with pytest.raises(ValueError, match="other settings .*seed"):
        other_seed.load_fit(path)


def test_sequential_calculator_equals_in_memory() -> None:
    net, x, y = _problem("mlp")
    model = ProjectedInfluence(net, F.cross_entropy, 30, regularization=LAMBDA).fit(loader(x, y))
    lazy = SequentialInfluenceCalculator(model).influences(
        loader(x[:9], y[:9], 4), loader(x, y, 16)
    )
    values = lazy.compute(aggregator=NestedTorchCatAggregator())
    assert torch.allclose(values, model.influences(x[:9], y[:9], x, y), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- gradient store


@pytest.mark.parametrize("preconditioned", [True, False])
def test_store_resumed_after_interruption_scores_like_influences(
    preconditioned: bool, tmp_path: Path
) -> None:
    net, x, y = _problem("cnn")
    data = loader(x, y, batch_size=8)
    model = ProjectedInfluence(net, F.cross_entropy, 24, regularization=LAMBDA).fit(data)
    path = tmp_path / "grads.zarr"
    source = model.gradient_model(preconditioned)
    original = source.influence_factors
    calls = {"n": 0}

    def interrupting(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    source.influence_factors = interrupting  # type: ignore[method-assign]
    model.gradient_model = lambda preconditioned=False: source  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        GradientStore.write(model, data, path, preconditioned=preconditioned)
    with pytest.raises(ValueError, match="incomplete; complete it with"):
        GradientStore(model, path)
    store = GradientStore.write(model, data, path, preconditioned=preconditioned, resume=True)
    assert calls["n"] == 6  # 2 chunks before the interruption, the 3 missing ones after it
    assert store.preconditioned is preconditioned and store.n_train == 40
    expected = model.influences(x[:7], y[:7], x, y)
    assert torch.allclose(store.influences(x[:7], y[:7]), expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(
        store.influences(x[:7], y[:7], rows_per_read=5), expected, rtol=1e-10, atol=1e-12
    )


def test_store_refuses_another_projection(tmp_path: Path) -> None:
    net, x, y = _problem("mlp")
    data = loader(x, y)
    model = ProjectedInfluence(net, F.cross_entropy, 20, seed=1).fit(data)
    GradientStore.write(model, data, tmp_path / "g.zarr")
    other = ProjectedInfluence(net, F.cross_entropy, 20, seed=2).fit(data)
    with pytest.raises(ValueError, match="written with another projection .*seed"):
        GradientStore(other, tmp_path / "g.zarr")
    with pytest.raises(TypeError, match="must be a ProjectedInfluence, got DirectInfluence"):
        GradientStore(DirectInfluence(net, F.cross_entropy, 0.1).fit(data), tmp_path / "g.zarr")


def test_store_written_by_dask_scores_like_influences(dask_client: Any, tmp_path: Path) -> None:
    import dask.array as da

    net, x, y = _problem("mlp")
    model = ProjectedInfluence(net, F.cross_entropy, 30, regularization=LAMBDA).fit(loader(x, y))
    x_dask, y_dask = da.from_array(x.numpy(), chunks=(10, 5)), da.from_array(y.numpy(), chunks=10)
    store = GradientStore.write_dask(model, x_dask, y_dask, tmp_path / "d.zarr", dask_client)
    expected = model.influences(x[:5], y[:5], x, y)
    assert torch.allclose(store.influences(x[:5], y[:5]), expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"projection_dim": 2.5}, TypeError, "'projection_dim' must be an int or None, got float"),
        (
            {"distortion_samples": 2},
            ValueError,
            "'distortion_samples' must be 0 .*at least 4, got 2",
        ),
        ({"distortion_samples": 4.0}, TypeError, "'distortion_samples' must be an int, got float"),
        ({"projection_dim": 0}, ValueError, "'projection_dim' must be >= 1, got 0"),
        ({"projection": "sparse"}, ValueError, "'projection' must be one of .*got 'sparse'"),
        ({"seed": None}, TypeError, "'seed' must be an int .*got NoneType"),
        (
            {"second_order_mode": SecondOrderMode.HESSIAN},
            ValueError,
            "'second_order_mode' must be GAUSS_NEWTON or GENERALIZED_GAUSS_NEWTON .*got HESSIAN",
        ),
        ({"projection_dim": 1}, ValueError, "'projection_dim' = 1 is too small for block"),
    ],
)
def test_bad_arguments_are_named(kwargs: Dict[str, Any], error: type, message: str) -> None:
    arguments: Dict[str, Any] = {"projection_dim": 8, **kwargs}
    net = make_mlp()
    with pytest.raises(error, match=message):
        ProjectedInfluence(net, F.cross_entropy, **arguments).fit(loader(*classification_data(8)))


def test_a_loss_that_is_neither_function_nor_task_is_named() -> None:
    with pytest.raises(
        TypeError,
        match=r"'loss' must be a loss function loss\(outputs, targets\) or an "
        r"influx.torch.Task, got str",
    ):
        ProjectedInfluence(make_mlp(), "cross_entropy", 8)  # type: ignore[arg-type]


def test_a_task_with_the_generalized_gauss_newton_curvature_is_refused() -> None:
    from influx.torch.data.task import SupervisedTask

    with pytest.raises(
        TypeError,
        match=r"'loss': the generalized Gauss-Newton .*got a task \(SupervisedTask\); use "
        "second_order_mode=GAUSS_NEWTON",
    ):
        ProjectedInfluence(make_mlp(), SupervisedTask(F.cross_entropy), 8, second_order_mode=GGN)


def test_layers_not_called_are_named() -> None:
    class Functional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.layer.weight, self.layer.bias)

    x, y = classification_data(8)
    model = ProjectedInfluence(Functional(), F.cross_entropy, 8)
    with pytest.raises(
        ValueError,
        match=r"Layers \['layer'\] were not called.* Block 'model': use projection='gaussian'",
    ):
        model.fit(loader(x, y))
    structure = OrderedDict([("all", ["layer.weight", "layer.bias"])])
    dense = ProjectedInfluence(
        Functional(), F.cross_entropy, 8, "gaussian", block_structure=structure
    )
    assert dense.fit(loader(x, y)).influences(x, y).shape == (8, 8)
