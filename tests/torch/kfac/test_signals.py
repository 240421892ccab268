"""The recorder of layer inputs and output gradients: it records on this thread's copy of the
model and never on the user's module (whose hook registries the copy shares)."""

from __future__ import annotations

import threading
from typing import List

import torch
from influx.torch.autodiff.stateless import functional_forward, structure_signature
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
