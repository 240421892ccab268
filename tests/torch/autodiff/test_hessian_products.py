"""Both Hessian-vector product strategies equal the exact Hessian (float64, torch.func)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Tuple

import pytest

import torch
from helpers import classification_data, make_mlp, rel_err
from influx.torch.curvature.batch_operation import HessianBatchOperation
from influx.torch.data.batches import TorchBatch
from influx.torch.functional import (
    create_batch_hessian_function,
    create_batch_hvp_function,
    create_batch_hvp_reverse_function,
    get_model_parameters,
)
from references import exact_hessian

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(outputs, torch.nn.functional.one_hot(targets, 3).double())


@pytest.mark.parametrize("loss", [torch.nn.functional.cross_entropy, mse], ids=["ce", "mse"])
@pytest.mark.parametrize("rows", [1, 3, 21, 40])
def test_reverse_and_forward_strategies_match_the_hessian(loss: Loss, rows: int) -> None:
    net = make_mlp(d_in=4, hidden=5, d_out=3)
    x, y = classification_data(n=20, d_in=4)
    params = get_model_parameters(net)
    expected = exact_hessian(net, loss, params, x, y)
    vs = torch.randn(rows, expected.shape[0], generator=torch.Generator().manual_seed(2))
    reverse = create_batch_hvp_reverse_function(net, loss, params)
    # one backward pass per vector, and the passes batched (more rows than a chunk at 40)
    per_row = create_batch_hvp_reverse_function(net, loss, params, vectorise_rows=False)
    batched = create_batch_hvp_reverse_function(net, loss, params, vectorise_rows=True)
    forward = create_batch_hvp_function(
        net, loss, params, reverse_max_rows=0, vectorised_reverse_max_parameters=0
    )
    vectorised = create_batch_hvp_function(net, loss, params, reverse_max_rows=0)
    default = create_batch_hvp_function(net, loss, params)
    for function in (reverse, per_row, batched, forward, vectorised, default):
        result = function(params, x, y, vs)
        assert result.shape == vs.shape
        assert not result.requires_grad
        assert rel_err(result, vs @ expected) < 1e-12


def test_reverse_strategy_on_a_block_and_a_loss_linear_in_a_parameter() -> None:
    """Restricted parameters give the sub-matrix; a parameter the loss is linear in (the
    output bias under a summed output) has a zero block, not an error."""
    net = make_mlp(d_in=4, hidden=5, d_out=3)
    x, y = classification_data(n=20, d_in=4)
    block = {n: p.detach() for n, p in net.named_parameters() if n.startswith("2.")}
    loss = torch.nn.functional.cross_entropy
    expected = exact_hessian(net, loss, block, x, y)
    vs = torch.randn(2, expected.shape[0], generator=torch.Generator().manual_seed(3))
    reverse = create_batch_hvp_reverse_function(net, loss, block)
    assert rel_err(reverse(block, x, y, vs), vs @ expected) < 1e-12
    # at least as many vectors as parameters: through the batched columns of the matrix
    many = torch.randn(expected.shape[0] + 3, expected.shape[0], dtype=torch.float64)
    result = reverse(block, x, y, many)
    assert not result.requires_grad
    assert rel_err(result, many @ expected) < 1e-12
    for rows in (expected.shape[0], expected.shape[0] + 3):
        default = create_batch_hvp_function(net, loss, block, vectorised_reverse_max_parameters=0)
        assert rel_err(default(block, x, y, many[:rows]), many[:rows] @ expected) < 1e-12

    def linear(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.sum() / outputs.shape[0]

    bias = {"2.bias": net[2].bias.detach()}
    for rows in (2, 3, 5):
        vs = torch.ones(rows, 3)
        result = create_batch_hvp_reverse_function(net, linear, bias)(bias, x, y, vs)
        assert torch.equal(result, torch.zeros(rows, 3))


def test_reverse_strategy_runs_in_several_threads() -> None:
    net = make_mlp(d_in=4, hidden=5, d_out=3)
    x, y = classification_data(n=20, d_in=4)
    loss = torch.nn.functional.cross_entropy
    params = get_model_parameters(net)
    expected = exact_hessian(net, loss, params, x, y)
    hvp = create_batch_hvp_function(net, loss, params)
    vs = torch.randn(4, 8, expected.shape[0], generator=torch.Generator().manual_seed(4))
    results: Dict[int, torch.Tensor] = {}

    def work(k: int) -> None:
        for _ in range(5):
            results[k] = hvp(params, x, y, vs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(4):
        assert rel_err(results[k], vs[k] @ expected) < 1e-12


def test_hessian_batch_operation_single_vector_and_no_grad_context() -> None:
    net = make_mlp(d_in=4, hidden=5, d_out=3)
    x, y = classification_data(n=20, d_in=4)
    loss = torch.nn.functional.cross_entropy
    operation = HessianBatchOperation(net, loss)
    expected = exact_hessian(net, loss, operation.params, x, y)
    v = torch.randn(expected.shape[0], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        result = operation.apply(TorchBatch(x, y), v)
    assert result.shape == v.shape
    assert rel_err(result, expected @ v) < 1e-12


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("loss", [torch.nn.functional.cross_entropy, mse], ids=["ce", "mse"])
def test_dense_hessian_reverse_over_reverse_on_a_block(loss: Loss, chunk_size: int | None) -> None:
    net = make_mlp(d_in=4, hidden=5, d_out=3)
    x, y = classification_data(n=20, d_in=4)
    block = {n: p.detach() for n, p in net.named_parameters() if n.startswith("0.")}
    expected = exact_hessian(net, loss, block, x, y)
    result = create_batch_hessian_function(net, loss, block)(block, x, y, chunk_size)
    assert result.shape == expected.shape
    assert rel_err(result, expected) < 1e-12
    assert torch.allclose(result, result.T, rtol=0, atol=1e-14)


class _Square(torch.autograd.Function):
    """$x^2$ whose second derivative reads a number (`.item()`), which a batched backward pass
    cannot do."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _TwiceProduct.apply(g, x)  # type: ignore[no-any-return]


class _TwiceProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, x)
        return 2 * g * x

    @staticmethod
    def backward(ctx: Any, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        g, x = ctx.saved_tensors
        factor = 2.0 if h.abs().sum().item() >= 0 else 0.0
        return factor * h * x, factor * h * g


class _SquaredLinear(torch.nn.Module):
    def __init__(self, custom: bool = True) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.custom = custom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.custom:
            return _Square.apply(self.linear(x))  # type: ignore[no-any-return]
        return self.linear(x) ** 2


def test_batched_backward_passes_fall_back_to_one_pass_per_vector(caplog) -> None:
    """A graph whose second backward pass cannot be batched gives the same products, one
    backward pass per vector."""
    torch.manual_seed(0)
    net = _SquaredLinear().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs - targets) ** 2).mean()

    params = get_model_parameters(net)
    plain = _SquaredLinear(custom=False).double()
    plain.load_state_dict(net.state_dict())
    expected = exact_hessian(plain, loss, params, x, y)
    vs = torch.randn(4, expected.shape[0], dtype=torch.float64)
    with caplog.at_level(logging.DEBUG, logger="influx.torch.autodiff.hessian_products"):
        batched = create_batch_hvp_reverse_function(net, loss, params, vectorise_rows=True)
        result = batched(params, x, y, vs)
    assert "Batched backward pass failed" in caplog.text
    assert rel_err(result, vs @ expected) < 1e-12
