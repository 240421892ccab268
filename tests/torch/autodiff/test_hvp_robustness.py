"""Hessian-vector products for every layer and loss: each parameter of Conv1d, Conv2d and
Linear models alone, with MSE, smooth L1 and cross-entropy, against `torch.func.hessian`.

Forward-mode rules fail for some of these in float32 (a `Conv1d` bias alone with smooth L1
or cross-entropy: "Trying to set a forward gradient that has a different size"); the products
must then come from reverse mode with the same values.
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, Tuple

import pytest
import torch.nn.functional as F

import torch
from helpers import loader, rel_err
from influx.torch import BlockMode, DirectInfluence
from influx.torch.functional import create_batch_hvp_function
from references import exact_hessian
from torch import nn

MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...], int]] = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(5, 3, 2), nn.Flatten(), nn.Linear(6, 2)), (5, 3), 2),
    "conv2d": (
        lambda: nn.Sequential(nn.Conv2d(5, 3, 3), nn.Flatten(), nn.Linear(27, 3)),
        (5, 5, 5),
        3,
    ),
    "linear": (lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)), (6,), 3),
}
LOSSES = {"mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss, "cross_entropy": F.cross_entropy}
CASES = [
    (model, loss, index)
    for model, loss in itertools.product(MODELS, LOSSES)
    for index in range(4)  # weight and bias of the first and of the last layer
]


def make_case(model_name: str, loss_name: str, dtype: torch.dtype, n: int = 10):
    factory, input_shape, out = MODELS[model_name]
    torch.manual_seed(0)
    net = factory().to(dtype)
    x = torch.randn(n, *input_shape, dtype=dtype)
    y = (
        torch.randint(0, out, (n,))
        if loss_name == "cross_entropy"
        else torch.randn(n, out, dtype=dtype)
    )
    return net, x, y, LOSSES[loss_name]


@pytest.mark.parametrize("model_name, loss_name, index", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_hvp_of_each_parameter_alone(model_name, loss_name, index, dtype, tol) -> None:
    net, x, y, loss = make_case(model_name, loss_name, dtype)
    name = list(dict(net.named_parameters()))[index]
    expected = exact_hessian(net, loss, {name: dict(net.named_parameters())[name]}, x, y)
    params = {name: dict(net.named_parameters())[name].detach()}
    eye = torch.eye(expected.shape[0], dtype=dtype)
    rows = create_batch_hvp_function(net, loss, params)(params, x, y, eye)
    assert rel_err(rows, expected) < tol
    for reverse_only in (True, False):
        at_call = create_batch_hvp_function(net, loss, reverse_only=reverse_only)
        assert rel_err(at_call(params, x, y, eye), expected) < tol


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_parameter_wise_direct_influence_of_a_conv1d_model(loss_name) -> None:
    """The case that used to crash: every block of a Conv1d model, in float32."""
    net, x, y, loss = make_case("conv1d", loss_name, torch.float32, n=20)
    model = DirectInfluence(net, loss, 1e-2, block_structure=BlockMode.PARAMETER_WISE)
    model.fit(loader(x, y, 10))
    values = model.influences(x[:3], y[:3], x, y)
    assert values.shape == (3, 20) and bool(torch.isfinite(values).all())
    for name, block in model.block_mapper.composable_block_dict.items():
        hessian = exact_hessian(net, loss, {name: dict(net.named_parameters())[name]}, x, y)
        inverse = torch.linalg.inv(hessian.double() + 1e-2 * torch.eye(hessian.shape[0]))
        identity = torch.eye(hessian.shape[0], dtype=torch.float32)
        assert rel_err(block.op.apply(identity).double(), inverse) < 1e-3
