"""The functions restored in the reference API's forms, against closed forms and torch.func.

All in float64; "exact" comparisons use a relative tolerance of 1e-10. The data loaders have
an uneven last batch, so that averages weighted by batch size are checked.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

import torch
from helpers import loader, make_mlp, rel_err
from influx.torch.curvature.batch_operation import (
    ChunkAveraging,
    GaussNewtonBatchOperation,
    HessianBatchOperation,
    PointAveraging,
)
from influx.torch.data.batches import TorchBatch
from influx.torch.functional import (
    create_batch_hvp_function,
    create_batch_loss_function,
    create_empirical_loss_function,
    create_hvp_function,
    create_matrix_jacobian_product_function,
    create_per_sample_gradient_function,
    create_per_sample_loss_function,
    create_per_sample_mixed_derivative_function,
    gauss_newton,
    hessian,
    hvp,
    model_hessian_nystroem_approximation,
    operator_nystroem_approximation,
    operator_spectral_approximation,
    randomized_nystroem_approximation,
)
from influx.torch.inverse.inverse_harmonic_mean import InverseHarmonicMeanBatchOperation
from influx.torch.operator import MatrixOperator
from influx.torch.util import (
    BlockMode,
    EkfacRepresentation,
    ModelInfoMixin,
    ModelParameterDictBuilder,
    TorchLinalgEighException,
    align_structure,
    align_with_model,
    empirical_cross_entropy_loss_fn,
    flatten_dimensions,
    get_model_parameters,
    reshape_vector_to_tensors,
    safe_torch_linalg_eigh,
    to_model_device,
)
from references import exact_hessian, flat_loss, per_sample_grads

TOL = 1e-10
N = 23  # batches of 10, 10 and 3


@pytest.fixture
def problem():
    net = make_mlp(d_in=4, hidden=3, d_out=3)
    x = torch.randn(N, 4)
    y = torch.randint(0, 3, (N,))
    return net, x, y


def reference_hessian(net, x, y, loss=F.cross_entropy):
    return exact_hessian(net, loss, None, x, y)


def per_sample_flat_grads(net, x, y, loss=F.cross_entropy):
    return per_sample_grads(net, loss, None, x, y)


# --- functions of a batch, parameters given at call time ---------------------------------


def test_batch_and_per_sample_losses(problem) -> None:
    net, x, y = problem
    params = get_model_parameters(net)
    batch_loss = create_batch_loss_function(net, F.cross_entropy)(params, x, y)
    assert rel_err(batch_loss, F.cross_entropy(net(x), y).detach()) < TOL
    per_sample = create_per_sample_loss_function(net, F.cross_entropy)(params, x, y)
    assert rel_err(per_sample, F.cross_entropy(net(x), y, reduction="none").detach()) < TOL


def test_per_sample_gradients_and_mixed_derivatives(problem) -> None:
    net, x, y = problem
    params = get_model_parameters(net)
    grads = create_per_sample_gradient_function(net, F.cross_entropy)(params, x, y)
    flat = flatten_dimensions(grads.values(), shape=(N, -1))
    assert rel_err(flat, per_sample_flat_grads(net, x, y)) < TOL

    mixed = create_per_sample_mixed_derivative_function(net, F.cross_entropy)(params, x, y)
    theta = flatten_dimensions(params.values())

    def single(theta_: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return flat_loss(net, F.cross_entropy, None, xi[None], yi[None])[0](theta_)

    # d/dx d/dtheta: (N, F, P) by forward differentiation of the gradient in x
    expected = vmap(jacrev(grad(single), argnums=1), in_dims=(None, 0, 0))(theta, x, y)
    assert (
        rel_err(flatten_dimensions(mixed.values(), shape=(N, 4, -1)), expected.transpose(1, 2))
        < TOL
    )


def test_matrix_jacobian_product_with_a_fixed_matrix(problem) -> None:
    net, x, y = problem
    params = get_model_parameters(net)
    g = torch.randn(5, sum(p.numel() for p in params.values()))
    product = create_matrix_jacobian_product_function(net, F.cross_entropy, g)(params, x, y)
    assert product.shape == (5, N)
    assert rel_err(product, g @ per_sample_flat_grads(net, x, y).T) < TOL
    with pytest.raises(TypeError, match="Parameter 'g' must be a torch.Tensor .* got list"):
        create_matrix_jacobian_product_function(net, F.cross_entropy, [1.0])  # type: ignore[arg-type]


@pytest.mark.parametrize("reverse_only", [True, False])
def test_hvp_and_batch_hvp(problem, reverse_only) -> None:
    net, x, y = problem
    params = get_model_parameters(net)
    h = reference_hessian(net, x, y)
    v = torch.randn(h.shape[0])
    loss = create_batch_loss_function(net, F.cross_entropy)
    product = hvp(lambda p: loss(p, x, y), params, align_structure(params, v), reverse_only)
    assert rel_err(flatten_dimensions(product.values()), h @ v) < TOL

    batch_hvp = create_batch_hvp_function(net, F.cross_entropy, reverse_only=reverse_only)
    assert rel_err(batch_hvp(params, x, y, v), h @ v) < TOL
    rows = torch.randn(4, h.shape[0])
    assert rel_err(batch_hvp(params, x, y, rows), rows @ h) < TOL
    # the form with the parameters given up front keeps working
    rows_hvp = create_batch_hvp_function(net, F.cross_entropy, params)
    assert rel_err(rows_hvp(params, x, y, rows), rows @ h) < TOL


# --- functions over a data loader --------------------------------------------------------


def test_empirical_loss_and_hvp_function_weight_batches_by_size(problem) -> None:
    net, x, y = problem
    data = loader(x, y, 10)
    params = get_model_parameters(net)
    empirical = create_empirical_loss_function(net, F.cross_entropy, data)
    assert rel_err(empirical(params), F.cross_entropy(net(x), y).detach()) < TOL

    h = reference_hessian(net, x, y)
    v = torch.randn(h.shape[0])
    for kwargs in ({}, {"use_average": False, "precompute_grad": False, "reverse_only": False}):
        function = create_hvp_function(net, F.cross_entropy, data, **kwargs)
        assert rel_err(function(v), h @ v) < TOL
        assert rel_err(function(torch.stack([v, 2 * v])), torch.stack([h @ v, 2 * h @ v])) < TOL


def test_hvp_function_tracks_gradients_on_request(problem) -> None:
    net, x, y = problem
    v = torch.randn(sum(p.numel() for p in net.parameters()))
    tracked = create_hvp_function(net, F.cross_entropy, loader(x, y, 10), track_gradients=True)(v)
    assert tracked.requires_grad
    untracked = create_hvp_function(net, F.cross_entropy, loader(x, y, 10))(v)
    assert not untracked.requires_grad


@pytest.mark.parametrize("use_hessian_avg", [True, False])
def test_hessian_over_a_loader(problem, use_hessian_avg) -> None:
    net, x, y = problem
    h = hessian(net, F.cross_entropy, loader(x, y, 10), use_hessian_avg=use_hessian_avg)
    assert rel_err(h, reference_hessian(net, x, y)) < TOL
    assert not h.requires_grad


def test_hessian_restricted_to_a_parameter(problem) -> None:
    net, x, y = problem
    last = {"2.bias": net[2].bias.detach()}
    h = hessian(net, F.cross_entropy, loader(x, y, 10), restrict_to=last)
    frozen = {k: v.detach() for k, v in net.named_parameters() if k != "2.bias"}

    def f(b: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, {**frozen, "2.bias": b}, (x,)), y)

    assert rel_err(h, torch.func.hessian(f)(last["2.bias"])) < TOL
    with pytest.raises(TypeError, match="parameters 'x' and 'y' must be tensors, got bool"):
        hessian(net, F.cross_entropy, last)


def test_gauss_newton_over_a_loader(problem) -> None:
    net, x, y = problem
    g = per_sample_flat_grads(net, x, y)
    expected = g.T @ g / N
    assert rel_err(gauss_newton(net, F.cross_entropy, loader(x, y, 10)), expected) < TOL
    assert rel_err(gauss_newton(g), expected) < TOL
    with pytest.raises(TypeError, match="'loss' and 'data_loader' are required"):
        gauss_newton(net)


# --- low-rank approximations -------------------------------------------------------------


def psd_matrix(p: int, rank: int) -> torch.Tensor:
    u = torch.randn(p, rank)
    return u @ u.T


def test_randomized_nystroem_with_matrix_and_shift_function() -> None:
    a = psd_matrix(12, 4)
    shifts = []

    def shift(sketch: torch.Tensor) -> torch.Tensor:
        shifts.append(sketch.shape)
        return 1e-12 * torch.linalg.norm(sketch)

    rep = randomized_nystroem_approximation(a, 12, 4, torch.float64, shift_func=shift)
    assert shifts == [(12, 4)]
    assert rel_err(rep.projections @ torch.diag(rep.eigen_vals) @ rep.projections.T, a) < 1e-8
    rep_device = randomized_nystroem_approximation(lambda m: a @ m, 12, 4, torch.float64, "cpu")
    assert (
        rel_err(
            rep_device.projections @ torch.diag(rep_device.eigen_vals) @ rep_device.projections.T, a
        )
        < 1e-8
    )


def test_operator_approximations() -> None:
    a = psd_matrix(15, 15) + torch.eye(15)
    nystroem = operator_nystroem_approximation(MatrixOperator(a), 15)
    assert (
        rel_err(nystroem.projections @ torch.diag(nystroem.eigen_vals) @ nystroem.projections.T, a)
        < 1e-8
    )
    top = operator_spectral_approximation(MatrixOperator(a), rank=4, eigen_computation_on_gpu=True)
    evals = torch.linalg.eigvalsh(a)
    assert rel_err(torch.sort(top.eigen_vals).values, evals[-4:]) < 1e-8
    assert rel_err(a @ top.projections, top.projections * top.eigen_vals) < 1e-6


def test_model_hessian_nystroem_approximation_at_full_rank_is_the_gauss_newton_matrix(
    problem,
) -> None:
    net, x, y = problem
    p = sum(t.numel() for t in net.parameters())
    rep = model_hessian_nystroem_approximation(net, F.cross_entropy, loader(x, y, 10), p)
    g = per_sample_flat_grads(net, x, y)
    rebuilt = rep.projections @ torch.diag(rep.eigen_vals) @ rep.projections.T
    assert rel_err(rebuilt, g.T @ g / N) < 1e-8
    assert rep.dtype == torch.float64


# --- util helpers ------------------------------------------------------------------------


def test_structure_helpers(problem) -> None:
    net, *_ = problem
    params = get_model_parameters(net)
    flat = torch.arange(sum(p.numel() for p in params.values()), dtype=torch.float64)
    aligned = align_structure(params, flat)
    assert [v.shape for v in aligned.values()] == [p.shape for p in params.values()]
    assert torch.equal(flatten_dimensions(aligned.values()), flat)
    assert list(align_with_model(tuple(aligned.values()), net)) == list(params)
    assert torch.equal(
        reshape_vector_to_tensors(torch.arange(6.0), [(2, 1), (4,)])[1], torch.arange(2.0, 6.0)
    )
    assert to_model_device(torch.ones(2), net).device == next(net.parameters()).device
    with pytest.raises(ValueError, match=r"'target' must have the keys \['0.weight'"):
        align_structure(params, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="'target' cannot be split into the shapes"):
        align_structure(params, torch.ones(3))
    with pytest.raises(ValueError, match="'target' must be a tensor.*got str"):
        align_structure(params, "x")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"'input_vector' has 5 elements, but the shapes \[\(2,\)\] need 2"
    ):
        reshape_vector_to_tensors(torch.ones(5), [(2,)])


def test_empirical_cross_entropy_gradient_closed_form() -> None:
    r"""d/dz sum_c sg(sqrt p_c) log p_c = sum_c sqrt(p_c) (e_c - p)."""
    logits = torch.randn(6, 4, requires_grad=True)
    value = empirical_cross_entropy_loss_fn(logits, torch.zeros(6), reduction="mean")
    (gradient,) = torch.autograd.grad(value, logits)
    p = torch.softmax(logits.detach(), dim=1)
    root = p.sqrt()
    expected = root - root.sum(dim=1, keepdim=True) * p
    assert rel_err(gradient, expected) < TOL
    assert rel_err(value.detach(), (root * p.log()).sum()) < TOL


def test_safe_eigh_and_its_exception() -> None:
    a = psd_matrix(5, 5)
    evals, evecs = safe_torch_linalg_eigh(a)
    assert rel_err(evecs @ torch.diag(evals) @ evecs.T, a) < TOL
    with pytest.raises(TorchLinalgEighException, match="torch.linalg.eigh failed"):
        safe_torch_linalg_eigh(torch.ones(2, 3))


def test_parameter_dict_builder_and_model_info(caplog) -> None:
    net = make_mlp()
    net[0].weight.requires_grad_(False)
    builder = ModelParameterDictBuilder(net, detach=True)
    full = builder.build_from_block_mode(BlockMode.FULL)
    assert list(full) == [""] and list(full[""]) == ["0.bias", "2.weight", "2.bias"]
    assert list(builder.build_from_block_mode(BlockMode.LAYER_WISE)) == ["0", "2"]
    assert list(builder.build_from_block_mode(BlockMode.PARAMETER_WISE)) == [
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    with caplog.at_level(logging.WARNING, logger="influx.torch.legacy.structures"):
        custom = builder.build(OrderedDict(first=["0.weight", "0.bias"]))
    assert list(custom["first"]) == ["0.bias"] and "'0.weight' of block 'first'" in caplog.text
    with pytest.raises(ValueError, match="names 'nope', which is not a parameter"):
        builder.build(OrderedDict(b=["nope"]))
    with pytest.raises(ValueError, match="'block_mode' must be a BlockMode, got 'full'"):
        builder.build_from_block_mode("full")  # type: ignore[arg-type]
    info = ModelInfoMixin(net)
    assert info.n_parameters == 6 + 21 and info.dtype == torch.float64


def test_ekfac_representation() -> None:
    layer = torch.nn.Linear(2, 3)
    rep = EkfacRepresentation(["fc"], [layer], [torch.eye(3)], [torch.eye(3) * 2], [torch.ones(9)])
    ((name, (module, a, g, d)),) = list(rep)
    assert name == "fc" and module is layer and torch.equal(g, 2 * torch.eye(3))
    evecs_a, evecs_g = rep.get_layer_evecs()
    assert torch.equal(evecs_a["fc"], torch.eye(3)) and torch.equal(evecs_g["fc"], 2 * torch.eye(3))
    assert torch.equal(rep.to("cpu").diags[0], torch.ones(9))


# --- batch operations --------------------------------------------------------------------


def test_batch_operation_dicts_and_rank_one_helpers(problem) -> None:
    net, x, y = problem
    batch = TorchBatch(x, y)
    op = HessianBatchOperation(net, F.cross_entropy)
    h = reference_hessian(net, x, y)
    rows = torch.randn(3, h.shape[0])
    as_dict = op.apply_to_dict(batch, align_structure(op.params, rows[0]))
    assert rel_err(flatten_dimensions(as_dict.values()), h @ rows[0]) < TOL
    batched = {
        k: t
        for k, t in zip(
            op.params, torch.split(rows, [p.numel() for p in op.params.values()], dim=1)
        )
    }
    batched = {k: t.reshape(3, *op.params[k].shape) for k, t in batched.items()}
    result = op.apply_to_dict(batch, batched)
    assert rel_err(flatten_dimensions(result.values(), shape=(3, -1)), rows @ h) < TOL
    with pytest.raises(ValueError, match="'mat' must be a dict with keys"):
        op.apply_to_dict(batch, {"x": torch.ones(1)})

    g = per_sample_flat_grads(net, x, y)
    gn = GaussNewtonBatchOperation(net, F.cross_entropy)
    assert rel_err(gn._apply_to_mat(batch, rows), rows @ (g.T @ g / N)) < TOL
    pieces = gn._generate_rank_one_mvp([g[:, :5], g[:, 5:]], [rows[:, :5], rows[:, 5:]])
    assert rel_err(torch.cat(pieces, dim=1), GaussNewtonBatchOperation._rank_one_mvp(g, rows)) < TOL

    lam = 0.3
    ihm = InverseHarmonicMeanBatchOperation(net, F.cross_entropy, 1.0)
    ihm.regularization = lam
    expected = (
        sum(
            torch.linalg.solve(torch.outer(gi, gi) + lam * torch.eye(g.shape[1]), rows.T).T
            for gi in g
        )
        / N
    )
    assert rel_err(ihm.apply(batch, rows), expected) < TOL
    pieces = ihm._generate_inverse_rank_one_updates(
        [g[:, :5], g[:, 5:]], [rows[:, :5], rows[:, 5:]], lam
    )
    assert rel_err(torch.cat(pieces, dim=1), expected) < TOL
    with pytest.raises(ValueError, match="'regularization' must be positive"):
        ihm.regularization = 0.0


def test_averaging_strategies() -> None:
    """Chunks of 1 and 3 points with values 1 and 4: plain mean 5/2, point-weighted 13/4."""
    chunks = [torch.full((1, 2), 1.0), torch.full((3, 2), 4.0)]
    assert torch.allclose(ChunkAveraging()(iter(chunks)), torch.full((3, 2), 5 / 2))
    assert torch.allclose(PointAveraging()(iter(chunks)), torch.full((3, 2), 13 / 4))
    dicts = [{"a": c, "b": 2 * c} for c in chunks]
    averaged = PointAveraging(batch_dim=0).as_dict_averaging()(iter(dicts))
    assert torch.allclose(averaged["b"], torch.full((3, 2), 13 / 2))
    assert torch.allclose(
        ChunkAveraging().as_dict_averaging()(iter(dicts))["a"], torch.full((3, 2), 5 / 2)
    )
    with pytest.raises(ValueError, match="'tensors' yielded nothing to average"):
        ChunkAveraging()(iter([]))
