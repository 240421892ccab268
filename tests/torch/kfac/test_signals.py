"""The recorder of layer inputs and output gradients: it records on this thread's copy of the
model and never on the user's module (whose hook registries the copy shares); a layer called
several times contributes the sum over its calls."""

from __future__ import annotations

import threading
from typing import List

import torch.nn.functional as F

import torch
from helpers import loader, rel_err
from influx.torch import DirectInfluence, EkfacInfluence
from influx.torch.autodiff.stateless import functional_forward, structure_signature
from influx.torch.curvature.operators import SecondOrderMode
from influx.torch.data.blocks import BlockMode
from influx.torch.kfac.layers import find_layers
from influx.torch.kfac.signals import LayerCalls


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def test_the_recorder_never_hooks_the_users_module() -> None:
    net = _net()
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    user_calls: List[torch.Tensor] = []
    net[0].register_forward_hook(lambda module, args, output: user_calls.append(output))
    x = torch.randn(5, 3)
    calls = LayerCalls(net, find_layers(net), structure_signature(net))
    with calls:
        # while recording, the user's module holds its own hook only
        assert [len(m._forward_hooks) for m in (net[0], net[2])] == [1, 0]
        functional_forward(net, tensors, (x,))
        net(x)  # a call of the user's module is not recorded
    assert [len(seen) for seen in calls.calls.values()] == [1, 1]
    torch.testing.assert_close(calls.calls["0"][0][0], x)
    assert len(user_calls) == 2  # the user's hook still runs on the copy and on the module
    assert [len(m._forward_hooks) for m in (net[0], net[2])] == [1, 0]


def test_training_passes_record_the_users_own_passes_and_keep_no_graph() -> None:
    """With `training_passes=True`: each differentiated call of the user's layers gives its
    input and its output gradient from the loop's backward pass; influx's functional copies,
    calls without gradient and calls whose backward never runs record nothing; the outputs
    are unchanged and the hooks go on exit."""
    net = _net()
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    expected = net(x)
    calls = LayerCalls(net, find_layers(net), training_passes=True)
    with calls:
        assert [len(m._forward_hooks) for m in (net[0], net[2])] == [1, 1]
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)  # no backward: nothing
        functional_forward(net, tensors, (x,))  # influx's copy shares the hooks: skipped
        with torch.no_grad():
            net(x)
        assert [len(seen) for seen in calls.calls.values()] == [0, 0]
        hidden: List[torch.Tensor] = []

        def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            output.retain_grad()
            hidden.append(output)

        handle = net[0].register_forward_hook(keep)
        F.cross_entropy(net(x), y).backward()
        handle.remove()
        assert [len(seen) for seen in calls.calls.values()] == [1, 1]
        inp, grad = calls.calls["0"][0]
        torch.testing.assert_close(inp, x, rtol=0, atol=0)
        torch.testing.assert_close(grad, hidden[0].grad, rtol=0, atol=0)
        assert not grad.requires_grad and grad.grad_fn is None
        calls.clear()
        assert [len(seen) for seen in calls.calls.values()] == [0, 0]
    assert [len(m._forward_hooks) for m in (net[0], net[2])] == [0, 0]


def test_two_threads_record_only_their_own_passes() -> None:
    net = _net()
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    layers, signature = find_layers(net), structure_signature(net)
    errors: List[BaseException] = []

    def record(n: int) -> None:
        try:
            for _ in range(50):
                calls = LayerCalls(net, layers, signature)
                with calls:
                    functional_forward(net, tensors, (torch.randn(n, 3),), signature)
                assert [[inp.shape[0] for inp, _ in seen] for seen in calls.calls.values()] == [
                    [n],
                    [n],
                ]
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=record, args=(n,)) for n in (3, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []


class _CalledTwice(torch.nn.Module):
    """A hand-written recurrent step: layer `a` is applied twice in one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.h = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.a(torch.tanh(self.a(x)))))


def _trained_twice() -> tuple:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] * x[:, 1] > 0).long()
    net = _CalledTwice()
    optimizer = torch.optim.Adam(net.parameters(), 0.05)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval(), x, y


def test_a_layer_called_twice_contributes_the_sum_over_its_calls() -> None:
    # At a huge lambda, (C + lambda I)^-1 ~ I / lambda: the influence is g_test^T g / lambda,
    # with g the full gradient of the shared layer (the sum over both calls).
    net, x, y = _trained_twice()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def single(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(net, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([grads[k].reshape(len(x), -1) for k in params], 1)
    lam = 1e8
    reference = g[:5] @ g.T / lam
    for update_diagonal in (False, True):
        model = EkfacInfluence(net, update_diagonal, lam, loss=F.cross_entropy)
        values = model.fit(loader(x, y, 32)).influences(x[:5], y[:5], x, y)
        assert rel_err(values, reference) < 1e-6


def test_a_layer_called_twice_agrees_with_the_exact_layer_wise_gauss_newton() -> None:
    net, x, y = _trained_twice()
    exact = DirectInfluence(
        net,
        F.cross_entropy,
        0.1,
        block_structure=BlockMode.LAYER_WISE,
        second_order_mode=SecondOrderMode.GAUSS_NEWTON,
    ).fit(loader(x, y, 32))
    reference = exact.influences(x[:8], y[:8], x, y).flatten()
    for update_diagonal in (False, True):
        model = EkfacInfluence(net, update_diagonal, 0.1, loss=F.cross_entropy)
        values = model.fit(loader(x, y, 32)).influences(x[:8], y[:8], x, y).flatten()
        assert torch.corrcoef(torch.stack([values, reference]))[0, 1] > 0.95
