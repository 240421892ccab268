"""The layers K-FAC, EK-FAC and the Kronecker projection work on: a weight tied between two
modules is refused by name (its gradient is the sum over the modules)."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

import torch
from helpers import classification_data, loader, rel_err
from influx.torch import DirectInfluence, EkfacInfluence, ProjectedInfluence
from influx.torch.curvature.operators import SecondOrderMode


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(5, 5, bias=False)
        self.b = torch.nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight
        self.h = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.b(torch.tanh(self.a(x)))))


TIED = r"ties the weight of modules \['a', 'b'\]"


def test_tied_weights_are_refused_by_the_kronecker_projection() -> None:
    torch.manual_seed(0)
    net, (x, y) = _Tied().eval(), classification_data(n=24)
    n_parameters = sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match=TIED):
        ProjectedInfluence(net, F.cross_entropy, n_parameters, regularization=0.1).fit(loader(x, y))
    # the dense projection at k = P is exact for them
    exact = DirectInfluence(
        net, F.cross_entropy, 0.1, second_order_mode=SecondOrderMode.GAUSS_NEWTON
    ).fit(loader(x, y))
    projected = ProjectedInfluence(
        net, F.cross_entropy, n_parameters, projection="gaussian", regularization=0.1
    ).fit(loader(x, y))
    reference = exact.influences(x[:4], y[:4], x, y)
    assert rel_err(projected.influences(x[:4], y[:4], x, y), reference) < 1e-8


def test_tied_weights_are_refused_by_ekfac_naming_the_modules() -> None:
    net = _Tied().eval()
    for update_diagonal in (False, True):
        with pytest.raises(ValueError, match=TIED) as error:
            EkfacInfluence(net, update_diagonal, 0.1, loss=F.cross_entropy)
        assert "block_structure" not in str(error.value)
