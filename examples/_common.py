"""Shared by the examples: sklearn's digits and a small float64 MLP trained with L-BFGS."""

from __future__ import annotations

from typing import Tuple

import numpy as np
from sklearn.datasets import load_digits

import torch

Data = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def digits(n_train: int = 1200, seed: int = 0) -> Data:
    """Digits scaled to [0, 1], split into `n_train` training and the rest held-out points."""
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    x = torch.tensor(x[perm] / 16.0, dtype=torch.float64)
    y = torch.tensor(y[perm], dtype=torch.long)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train_mlp(
    x: torch.Tensor, y: torch.Tensor, hidden: int = 16, weight_decay: float = 1e-3, seed: int = 0
) -> torch.nn.Module:
    """A 64-hidden-10 tanh MLP trained to convergence on the L2-regularised cross-entropy."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    ).double()
    optimizer = torch.optim.LBFGS(net.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        penalty = sum((p**2).sum() for p in net.parameters())
        value = torch.nn.functional.cross_entropy(net(x), y) + weight_decay * penalty
        value.backward()
        return value

    optimizer.step(closure)
    return net.eval()
