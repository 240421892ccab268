"""Recurrent networks (`nn.LSTM`, `nn.GRU`, `nn.RNN` and their cells), whose kernels `vmap`
cannot map: per-sample gradients, curvature products and every inverse method, against
`torch.func` references in float64."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import torch
from helpers import loader, rel_err
from influx import InfluenceMode
from influx.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    ProjectedInfluence,
    SecondOrderMode,
)
from influx.torch.autodiff.derivatives import create_per_sample_gradient_function
from influx.torch.autodiff.model_call import is_vmap_limitation, vmap_unsupported_modules
from references import explicit_influences, flat_loss, per_sample_grads

F = torch.nn.functional
D_IN, HIDDEN, STEPS, CLASSES = 2, 3, 4, 2


class SequenceClassifier(torch.nn.Module):
    """A recurrent layer over the sequence, a `Linear` head on its last output."""

    def __init__(self, kind: str, num_layers: int = 1, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(torch.nn, kind)(D_IN, HIDDEN, num_layers, batch_first=batch_first)
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])  # type: ignore[no-any-return]


class CellClassifier(torch.nn.Module):
    """A recurrent cell unrolled over the time steps, a `Linear` head on its last state."""

    def __init__(self, kind: str):
        super().__init__()
        self.cell = getattr(torch.nn, kind)(D_IN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        hidden = state[0] if isinstance(state, tuple) else state
        return self.head(hidden)  # type: ignore[no-any-return]


def data(n: int = 12, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, STEPS, D_IN, generator=gen), torch.randint(
        0, CLASSES, (n,), generator=gen
    )


MODELS = {
    "lstm": lambda: SequenceClassifier("LSTM"),
    "gru-2-layers": lambda: SequenceClassifier("GRU", num_layers=2),
    "rnn-time-first": lambda: SequenceClassifier("RNN", batch_first=False),
    "lstm-cell": lambda: CellClassifier("LSTMCell"),
    "gru-cell": lambda: CellClassifier("GRUCell"),
    "rnn-cell": lambda: CellClassifier("RNNCell"),
}


def frozen_rnn() -> torch.nn.Module:
    net = SequenceClassifier("LSTM", num_layers=2)
    net.rnn.requires_grad_(False)
    return net


@pytest.mark.parametrize("name", list(MODELS))
def test_direct_matches_torch_func_hessian(name: str) -> None:
    torch.manual_seed(0)
    net = MODELS[name]().eval()
    x, y = data()
    lam = 0.01
    values = DirectInfluence(net, F.cross_entropy, lam).fit(loader(x, y, 5))
    expected = explicit_influences(net, F.cross_entropy, None, x, y, x[:3], y[:3], lam, loop=True)
    assert rel_err(values.influences(x[:3], y[:3], x, y), expected) < 1e-10


def test_frozen_recurrent_layer_with_trainable_head() -> None:
    torch.manual_seed(0)
    net = frozen_rnn().eval()
    x, y = data()
    model = DirectInfluence(net, F.cross_entropy, 0.01).fit(loader(x, y, 5))
    assert model.n_parameters == HIDDEN * CLASSES + CLASSES
    expected = explicit_influences(net, F.cross_entropy, None, x, y, x[:3], y[:3], 0.01, loop=True)
    assert rel_err(model.influences(x[:3], y[:3], x, y), expected) < 1e-10


def test_per_sample_gradients_match_reference_and_log_the_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    net = SequenceClassifier("LSTM").eval()
    x, y = data()
    params = {n: p.detach() for n, p in net.named_parameters()}
    function = create_per_sample_gradient_function(net, F.cross_entropy, params)
    with caplog.at_level(logging.INFO, logger="influx.torch.autodiff.per_sample"):
        grads = function(params, x, y)
    flat = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)
    assert rel_err(flat, per_sample_grads(net, F.cross_entropy, None, x, y, loop=True)) < 1e-12
    assert function.strategy == "chunked"  # type: ignore[attr-defined]
    assert "recurrent layers (rnn)" in caplog.text


def test_gauss_newton_and_generalized_gauss_newton() -> None:
    torch.manual_seed(0)
    net = SequenceClassifier("GRU").eval()
    x, y = data()
    lam = 0.05
    g_train = per_sample_grads(net, F.cross_entropy, None, x, y, loop=True)
    g_test = g_train[:3]
    gn = g_train.T @ g_train / x.shape[0]
    expected = g_test @ torch.linalg.solve(gn + lam * torch.eye(gn.shape[0]), g_train.T)
    model = DirectInfluence(
        net, F.cross_entropy, lam, second_order_mode=SecondOrderMode.GAUSS_NEWTON
    ).fit(loader(x, y, 5))
    assert rel_err(model.influences(x[:3], y[:3], x, y), expected) < 1e-10
    ggn = DirectInfluence(
        net, F.cross_entropy, lam, second_order_mode=SecondOrderMode.GENERALIZED_GAUSS_NEWTON
    ).fit(loader(x, y, 5))
    values = ggn.influences(x[:3], y[:3], x, y)
    assert values.shape == (3, x.shape[0]) and bool(torch.isfinite(values).all())


@pytest.mark.parametrize("name", ["lstm", "gru-cell", "frozen"])
def test_iterative_low_rank_kronecker_and_projected_methods_run(name: str) -> None:
    torch.manual_seed(0)
    net = (frozen_rnn() if name == "frozen" else MODELS[name]()).eval()
    x, y = data()
    data_loader = loader(x, y, 5)
    # H + 0.1 I of some of these networks is indefinite (CG stops there): the Gauss-Newton
    gn = SecondOrderMode.GAUSS_NEWTON
    direct = DirectInfluence(net, F.cross_entropy, 0.1, second_order_mode=gn).fit(data_loader)
    expected = direct.influences(x[:3], y[:3], x, y)
    cg = CgInfluence(
        net, F.cross_entropy, 0.1, rtol=1e-12, atol=1e-14, maxiter=500, second_order_mode=gn
    )
    assert rel_err(cg.fit(data_loader).influences(x[:3], y[:3], x, y), expected) < 1e-6
    arnoldi = ArnoldiInfluence(
        net, F.cross_entropy, 0.1, rank=direct.n_parameters, second_order_mode=gn
    )
    assert rel_err(arnoldi.fit(data_loader).influences(x[:3], y[:3], x, y), expected) < 1e-6
    others = [
        EkfacInfluence(net, loss=F.cross_entropy, regularization=0.1, layers=["head"]),
        ProjectedInfluence(net, F.cross_entropy, projection_dim=8, regularization=0.1),
        ProjectedInfluence(
            net, F.cross_entropy, projection_dim=8, projection="gaussian", regularization=0.1
        ),
    ]
    for model in others:
        values = model.fit(data_loader).influences(x[:3], y[:3], x, y)
        assert values.shape == (3, x.shape[0]) and bool(torch.isfinite(values).all())


def test_recurrent_modules_are_recognised() -> None:
    assert vmap_unsupported_modules(SequenceClassifier("LSTM")) == ["rnn"]
    assert vmap_unsupported_modules(torch.nn.GRUCell(2, 3)) == ["GRUCell"]
    assert vmap_unsupported_modules(torch.nn.Linear(2, 3)) == []
    error = RuntimeError("Batching rule not implemented for aten::lstm.input.")
    assert is_vmap_limitation(error)
    assert not is_vmap_limitation(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_perturbation_mode_matches_torch_func_reference() -> None:
    torch.manual_seed(0)
    net = SequenceClassifier("LSTM").eval()
    x, y = data(n=8)
    lam = 0.01
    model = DirectInfluence(net, F.cross_entropy, lam).fit(loader(x, y, 4))
    values = model.influences(x[:2], y[:2], x[:3], y[:3], InfluenceMode.Perturbation)
    f, theta = flat_loss(net, F.cross_entropy, None, x, y)
    h = torch.func.hessian(f)(theta)
    g_test = per_sample_grads(net, F.cross_entropy, None, x[:2], y[:2], loop=True)
    factors = torch.linalg.solve(h + lam * torch.eye(h.shape[0]), g_test.T).T
    expected = torch.stack(
        [
            torch.einsum(
                "ip,ptd->itd",
                factors,
                torch.func.jacrev(
                    lambda xi, j=j: torch.func.grad(f)(theta, xi[None], y[j : j + 1])
                )(x[j]),
            )
            for j in range(3)
        ],
        dim=1,
    )
    assert values.shape == (2, 3, STEPS, D_IN)
    assert rel_err(values, expected) < 1e-10


class PackedClassifier(torch.nn.Module):
    """Padded sequences and their lengths, packed for the GRU; the head on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.GRU(D_IN, HIDDEN, batch_first=True)
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        return self.head(self.rnn(packed)[1][-1])  # type: ignore[no-any-return]


class PackedData(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, lengths: torch.Tensor, y: torch.Tensor):
        self.x, self.lengths, self.y = x, lengths, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        return (self.x[i], self.lengths[i]), self.y[i]


def test_packed_sequences_match_the_autograd_hessian() -> None:
    torch.manual_seed(0)
    net = PackedClassifier().eval()
    x, y = data(n=10)
    lengths = torch.randint(1, STEPS + 1, (10,), generator=torch.Generator().manual_seed(4))
    model = DirectInfluence(net, F.cross_entropy, 0.01)
    model.fit(torch.utils.data.DataLoader(PackedData(x, lengths, y), batch_size=5))
    values = model.influences((x[:2], lengths[:2]), y[:2], (x, lengths), y)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(t: torch.Tensor, xx: torch.Tensor, ll: torch.Tensor, yy: torch.Tensor) -> Any:
        parts = torch.split(t, [s.numel() for s in shapes])
        p = {n: c.reshape(s) for n, c, s in zip(names, parts, shapes)}
        return F.cross_entropy(torch.func.functional_call(net, p, (xx, ll)), yy)

    # torch.func's transforms cannot run packed sequences: torch.autograd references
    h = torch.autograd.functional.hessian(lambda t: loss(t, x, lengths, y), theta)
    g = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda t, i=i: loss(t, x[i : i + 1], lengths[i : i + 1], y[i : i + 1]), theta
            )
            for i in range(10)
        ]
    )
    expected = g[:2] @ torch.linalg.solve(h + 0.01 * torch.eye(h.shape[0]), g.T)
    assert rel_err(values, expected) < 1e-10


def ggn_reference(
    net: torch.nn.Module, inputs: tuple[Any, ...], y: torch.Tensor, lam: float, n_test: int
) -> torch.Tensor:
    """$g_{\\text{test}} (J^\\top \\nabla^2_z L J + \\lambda I)^{-1} g^\\top$ with the mean
    cross-entropy $L$, from `torch.autograd.functional` (which also runs packed sequences)."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def outputs(t: torch.Tensor, *xs: Any) -> torch.Tensor:
        parts = torch.split(t, [s.numel() for s in shapes])
        p = {n: c.reshape(s) for n, c, s in zip(names, parts, shapes)}
        return torch.func.functional_call(net, p, xs)  # type: ignore[no-any-return]

    z = outputs(theta, *inputs)
    jac = torch.autograd.functional.jacobian(lambda t: outputs(t, *inputs), theta)
    jac = jac.reshape(-1, theta.numel())
    h_z = torch.autograd.functional.hessian(
        lambda out: F.cross_entropy(out.reshape(z.shape), y), z.detach().reshape(-1)
    )
    ggn = jac.T @ h_z @ jac
    g = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda t, i=i: F.cross_entropy(
                    outputs(t, *(a[i : i + 1] for a in inputs)), y[i : i + 1]
                ),
                theta,
            )
            for i in range(len(y))
        ]
    )
    return g[:n_test] @ torch.linalg.solve(ggn + lam * torch.eye(theta.numel()), g.T)


def test_generalized_gauss_newton_matches_the_autograd_reference() -> None:
    """The GGN of recurrent models (torch.autograd path), unpacked and packed sequences."""
    torch.manual_seed(0)
    lam = 0.01
    x, y = data(n=10)
    lstm = SequenceClassifier("LSTM").eval()
    model = DirectInfluence(
        lstm, F.cross_entropy, lam, second_order_mode=SecondOrderMode.GENERALIZED_GAUSS_NEWTON
    ).fit(loader(x, y, 5))
    expected = ggn_reference(lstm, (x,), y, lam, 3)
    assert rel_err(model.influences(x[:3], y[:3], x, y), expected) < 1e-10

    packed = PackedClassifier().eval()
    lengths = torch.randint(1, STEPS + 1, (10,), generator=torch.Generator().manual_seed(4))
    model = DirectInfluence(
        packed, F.cross_entropy, lam, second_order_mode=SecondOrderMode.GENERALIZED_GAUSS_NEWTON
    ).fit(torch.utils.data.DataLoader(PackedData(x, lengths, y), batch_size=5))
    values = model.influences((x[:2], lengths[:2]), y[:2], (x, lengths), y)
    assert rel_err(values, ggn_reference(packed, (x, lengths), y, lam, 2)) < 1e-10
