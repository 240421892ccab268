"""Validation against reality: predicted vs actual change of a test loss after retraining."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_breast_cancer

import torch
from helpers import loader
from influx.torch import DirectInfluence

F = torch.nn.functional
WEIGHT_DECAY = 0.01


def _train(
    x: torch.Tensor, y: torch.Tensor, init: torch.nn.Module | None = None
) -> torch.nn.Module:
    net = torch.nn.Linear(x.shape[1], 2)
    if init is not None:
        net.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(
        net.parameters(),
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(net(x), y) + WEIGHT_DECAY * sum(
            (p**2).sum() for p in net.parameters()
        )
        value.backward()
        return value

    opt.step(closure)
    return net


def test_predicted_loss_change_correlates_with_retraining() -> None:
    data = load_breast_cancer()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(data.target))[:160]
    x_all = torch.tensor(data.data[idx][:, :10])
    x_all = (x_all - x_all.mean(0)) / x_all.std(0)
    y_all = torch.tensor(data.target[idx])
    x, y = x_all[:120], y_all[:120]
    x_test, y_test = x_all[120:121], y_all[120:121]
    n = len(x)
    net = _train(x, y)
    # The comparison assumes the exact optimum of the convex objective: check it is reached.
    objective = F.cross_entropy(net(x), y) + WEIGHT_DECAY * sum(
        (p**2).sum() for p in net.parameters()
    )
    gradient = torch.autograd.grad(objective, list(net.parameters()))
    assert max(float(g.abs().max()) for g in gradient) < 1e-6
    # The objective's Hessian is the loss Hessian + 2 * weight_decay * I.
    model = DirectInfluence(net, F.cross_entropy, 2 * WEIGHT_DECAY).fit(loader(x, y, 32))
    influence = model.influences(x_test, y_test, x, y)[0]
    # Removing point j changes the test loss by about +influence_j / n (a helpful point,
    # positive influence, raises the loss when removed).
    candidates = torch.argsort(influence.abs(), descending=True)[:30].tolist()
    with torch.no_grad():
        base = float(F.cross_entropy(net(x_test), y_test))
    predicted, actual = [], []
    for j in candidates:
        keep = torch.arange(n) != j
        retrained = _train(x[keep], y[keep], init=net)
        with torch.no_grad():
            actual.append(float(F.cross_entropy(retrained(x_test), y_test)) - base)
        predicted.append(float(influence[j]) / n)
    pearson = float(np.corrcoef(predicted, actual)[0, 1])
    assert pearson > 0.95, pearson
    # the scale is right too, not only the direction
    slope = float(np.polyfit(predicted, actual, 1)[0])
    assert 0.7 < slope < 1.4, slope
