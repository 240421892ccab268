"""A fitted model can be pickled, saved or shared by threads while it computes.

Computations evaluate the network on per-thread structure-only copies of the module, so the
user's module is never modified (no parameter swapping during `influences`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List

import cloudpickle
import pytest

import torch
from helpers import classification_data, loader, make_mlp
from influx.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from influx.torch.functional import functional_forward

F = torch.nn.functional
N_COPIES = 60


def _makers(net: torch.nn.Module) -> Dict[str, Callable[[], Any]]:
    gauss_newton = SecondOrderMode.GAUSS_NEWTON
    return {
        "direct": lambda: DirectInfluence(net, F.cross_entropy, 0.1),
        "cg": lambda: CgInfluence(net, F.cross_entropy, 0.1, maxiter=20),
        "lissa": lambda: LissaInfluence(
            net, F.cross_entropy, 0.1, maxiter=10, scale=50.0, warn_on_max_iteration=False
        ),
        "arnoldi": lambda: ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=5),
        "nystroem": lambda: NystroemSketchInfluence(
            net, F.cross_entropy, 0.1, rank=5, second_order_mode=gauss_newton
        ),
        "ihm": lambda: InverseHarmonicMeanInfluence(
            net, F.cross_entropy, 0.1, second_order_mode=gauss_newton
        ),
        "ekfac": lambda: EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1),
    }


NAMES = list(_makers(torch.nn.Identity()))


@pytest.fixture(scope="module")
def fitted() -> Dict[str, Any]:
    torch.manual_seed(0)
    x, y = classification_data(40)
    net = make_mlp()
    data = loader(x, y, 20)
    return {name: make().fit(data) for name, make in _makers(net).items()}


@pytest.mark.parametrize("name", NAMES)
def test_pickle_and_save_while_another_thread_computes(
    fitted: Dict[str, Any], name: str, tmp_path: Path
) -> None:
    model = fitted[name]
    x, y = classification_data(40)
    x_test, y_test = classification_data(4, seed=3)
    reference = model.influences(x_test, y_test, x, y)
    stop = threading.Event()
    computed: List[torch.Tensor] = []
    errors: List[BaseException] = []

    def compute() -> None:
        try:
            while not stop.is_set() or not computed:
                computed.append(model.influences(x_test, y_test, x, y))
        except BaseException as error:  # reported below
            errors.append(error)

    worker = threading.Thread(target=compute)
    worker.start()
    failures: List[str] = []
    try:
        for i in range(N_COPIES):
            try:
                cloudpickle.dumps(model)
                model.save(tmp_path / "fit.pt")
            except Exception as error:
                failures.append(f"{i}: {type(error).__name__}: {error}")
    finally:
        stop.set()
        worker.join(timeout=300)
    assert not worker.is_alive()
    assert not errors, errors
    assert failures == [], failures[:3]
    for values in computed:
        torch.testing.assert_close(values, reference, rtol=1e-12, atol=1e-14)
    # a copy made while the model computes is complete: it computes what the model computes
    stop.clear()
    computed.clear()
    worker = threading.Thread(target=compute)
    worker.start()
    try:
        payload = cloudpickle.dumps(model)
    finally:
        stop.set()
        worker.join(timeout=300)
    copy = cloudpickle.loads(payload)
    torch.testing.assert_close(copy.influences(x_test, y_test, x, y), reference)


@pytest.mark.parametrize("name", NAMES)
def test_two_threads_give_the_results_of_one(fitted: Dict[str, Any], name: str) -> None:
    model = fitted[name]
    assert model.is_thread_safe
    x, y = classification_data(40)
    tests = [classification_data(5, seed=s) for s in (3, 4, 5, 6)]
    alone = [model.influences(xt, yt, x, y) for xt, yt in tests]
    with ThreadPoolExecutor(max_workers=2) as pool:
        shared = list(pool.map(lambda t: model.influences(t[0], t[1], x, y), tests))
    for a, b in zip(alone, shared):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_computations_never_modify_the_module() -> None:
    """The user's module keeps its own parameter objects during and after a computation."""
    x, y = classification_data(20)
    net = make_mlp()
    before = {name: p for name, p in net.named_parameters()}
    values = {name: p.detach().clone() for name, p in net.named_parameters()}
    seen: List[Dict[str, torch.Tensor]] = []

    def record(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        seen.append(dict(net.named_parameters()))

    handle = net[2].register_forward_hook(record)
    try:
        DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y)).influences(x[:3], y[:3])
    finally:
        handle.remove()
    assert seen, "the hook ran on the structure-only copy"
    for parameters in seen:  # while the forward pass ran, the user's module was unchanged
        assert all(parameters[n] is before[n] for n in before)
    assert all(torch.equal(p, values[n]) for n, p in net.named_parameters())


def test_functional_forward_follows_train_and_eval_mode() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    tensors = {n: p.detach() for n, p in net.named_parameters()}
    x = torch.randn(6, 4)
    net.eval()
    torch.testing.assert_close(functional_forward(net, tensors, (x,)), net(x), rtol=0, atol=0)
    net.train()
    torch.manual_seed(1)
    dropped = functional_forward(net, tensors, (x,))
    torch.manual_seed(1)
    torch.testing.assert_close(dropped, net(x), rtol=0, atol=0)


def test_functional_forward_keeps_tied_weights_and_follows_structure_changes() -> None:
    embed = torch.nn.Linear(3, 3, bias=False)
    net = torch.nn.Sequential(embed, torch.nn.Tanh(), embed)
    x = torch.randn(5, 3)
    weight = torch.randn(3, 3)
    # one name for the tied weight is enough: the copy keeps the two layers tied
    expected = torch.tanh(x @ weight.T) @ weight.T
    torch.testing.assert_close(functional_forward(net, {"0.weight": weight}, (x,)), expected)
    net[1] = torch.nn.ReLU()
    expected = torch.relu(x @ weight.T) @ weight.T
    torch.testing.assert_close(functional_forward(net, {"0.weight": weight}, (x,)), expected)


def test_functional_forward_on_parametrized_and_recurrent_modules() -> None:
    """Modules that refuse pickling (parametrizations) or keep their own lists of weights
    (recurrent layers) are evaluated with the given tensors."""
    from torch.nn.utils.parametrizations import weight_norm

    net = torch.nn.Sequential(weight_norm(torch.nn.Linear(4, 3)), torch.nn.Tanh())
    x = torch.randn(5, 4)
    tensors = {n: p.detach() for n, p in net.named_parameters()}
    torch.testing.assert_close(functional_forward(net, tensors, (x,)), net(x), rtol=0, atol=0)
    scaled = dict(
        tensors,
        **{
            "0.parametrizations.weight.original0": 2
            * tensors["0.parametrizations.weight.original0"]
        },
    )
    expected = torch.tanh(2 * (x @ net[0].weight.T) + net[0].bias)
    torch.testing.assert_close(functional_forward(net, scaled, (x,)), expected)

    gru = torch.nn.GRU(3, 2, batch_first=True)
    sequences = torch.randn(2, 4, 3)
    before, _ = gru(sequences)
    zeros = {n: torch.zeros_like(p) for n, p in gru.named_parameters()}
    output, _ = functional_forward(gru, zeros, (sequences,))
    torch.testing.assert_close(output, torch.zeros(2, 4, 2), rtol=0, atol=0)
    torch.testing.assert_close(gru(sequences)[0], before, rtol=0, atol=0)  # gru unchanged


def test_hooks_of_the_module_apply_as_registered() -> None:
    net = make_mlp()
    tensors = {n: p.detach() for n, p in net.named_parameters()}
    x = torch.randn(4, 5)
    calls: List[int] = []
    functional_forward(net, tensors, (x,))  # the copy exists before the hook is registered
    handle = net[0].register_forward_hook(lambda *args: calls.append(1))
    functional_forward(net, tensors, (x,))
    handle.remove()
    functional_forward(net, tensors, (x,))
    assert calls == [1]
