"""A layer called more than once in one forward pass: K-FAC / EK-FAC sum its uses as further
positions, checked against the defined sums computed by hand and, where the Fisher is exactly
Kronecker, against the direct solve of the exact empirical Fisher (float64)."""

from __future__ import annotations

import torch.nn.functional as F

import torch
from helpers import loader, rel_err
from influx.torch.curvature.operators import SecondOrderMode
from influx.torch.models import DirectInfluence, EkfacInfluence


class _Recurrent(torch.nn.Module):
    """A hand-written recurrent step: layer `a` (with bias) is applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.h = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.a(torch.tanh(self.a(x)))))


def test_the_factors_of_a_layer_called_twice_are_the_sums_over_its_uses() -> None:
    torch.manual_seed(0)
    net = _Recurrent().double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (20,), generator=gen)
    model = EkfacInfluence(net, loss=F.cross_entropy, hessian_regularization=0.1)
    factors = model.fit(loader(x, y, 8)).kronecker_factors["a"]
    # by hand: the inputs a_t (with a 1 for the bias) and output gradients delta_t of both calls
    s1 = net.a(x)
    a2 = torch.tanh(s1)
    s2 = net.a(a2)
    out = net.h(torch.tanh(s2))
    # the gradient of the per-sample losses: of their sum
    d1, d2 = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), (s1, s2))
    ones = torch.ones(20, 1, dtype=torch.float64)
    inputs = [torch.cat([x, ones], 1), torch.cat([a2.detach(), ones], 1)]
    expected_a = sum(a.T @ a for a in inputs) / (2 * 20)
    expected_g = (d1.T @ d1 + d2.T @ d2) / 20
    assert rel_err(factors.input_covariance, expected_a) < 1e-12
    assert rel_err(factors.output_grad_covariance, expected_g) < 1e-12
    assert factors.n_samples == 20


class _Siamese(torch.nn.Module):
    """One bias-free layer applied to both halves of the input, the outputs added."""

    def __init__(self, d: int = 3, m: int = 2) -> None:
        super().__init__()
        self.d = d
        self.shared = torch.nn.Linear(d, m, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x[:, : self.d]) + self.shared(x[:, self.d :])


def _linear_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Linear in the prediction: the output gradient of every point and use is -target."""
    return -(prediction * target).sum(dim=1).mean()


def test_a_shared_layer_is_exact_where_the_fisher_is_kronecker() -> None:
    """The per-sample gradient is c (u ± v)^T; with the same c for every point and the points
    in pairs (u, v), (u, -v) the cross terms of the two uses cancel and
    F = c c^T ⊗ (1/n) Σ (u u^T + v v^T) = G ⊗ A exactly, with A and G summed over the uses."""
    torch.manual_seed(0)
    net = _Siamese().double().eval()
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    x = torch.cat([torch.cat([u, v], 1), torch.cat([u, -v], 1)])
    y = torch.tensor([[1.0, 0.5]], dtype=torch.float64).expand(24, 2)
    exact = DirectInfluence(
        net, _linear_loss, 0.1, second_order_mode=SecondOrderMode.GAUSS_NEWTON
    ).fit(loader(x, y))
    expected = exact.influences(x[:5], y[:5], x, y)
    for update_diagonal in (False, True):
        model = EkfacInfluence(net, update_diagonal, 0.1, loss=_linear_loss)
        values = model.fit(loader(x, y, 8)).influences(x[:5], y[:5], x, y)
        assert rel_err(values, expected) < 1e-10
