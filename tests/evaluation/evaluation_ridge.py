"""Ridge regression retrained in closed form: a fast, exact train_fn / measure_fn pair.

The model minimises $\\sum_{j \\in S} (x_j^\\top\\theta - y_j)^2 + \\alpha\\|\\theta\\|^2$, so
$\\theta_S = (X_S^\\top X_S + \\alpha I)^{-1} X_S^\\top y_S$; a seed adds a seeded
perturbation of scale `noise` to the parameters (so that seeds differ). The test losses are
squared errors.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from numpy.typing import NDArray


class RidgeProblem:
    def __init__(
        self,
        n: int = 40,
        d: int = 3,
        n_test: int = 6,
        alpha: float = 1.0,
        noise: float = 0.0,
        seed: int = 0,
        test_offset: float = 0.0,
    ):
        rng = np.random.default_rng(seed)
        self.alpha, self.noise = alpha, noise
        theta = rng.normal(size=d)
        self.x = rng.normal(size=(n, d))
        self.y = self.x @ theta + 0.5 * rng.normal(size=n)
        self.x_test = rng.normal(size=(n_test, d))
        self.y_test = self.x_test @ theta + 0.5 * rng.normal(size=n_test) + test_offset

    @property
    def n_train(self) -> int:
        return self.x.shape[0]

    def train(self, indices: NDArray[np.int64], seed: int) -> NDArray[np.float64]:
        x, y = self.x[indices], self.y[indices]
        a = x.T @ x + self.alpha * np.eye(x.shape[1])
        theta = np.linalg.solve(a, x.T @ y)
        if self.noise:
            theta = theta + self.noise * np.random.default_rng(seed).normal(size=theta.shape)
        return theta

    def measure(self, theta: NDArray[np.float64]) -> NDArray[np.float64]:
        return (self.x_test @ theta - self.y_test) ** 2

    def _full(self) -> Tuple[NDArray, NDArray, NDArray]:
        a = self.x.T @ self.x + self.alpha * np.eye(self.x.shape[1])
        theta = np.linalg.solve(a, self.x.T @ self.y)
        return a, theta, self.x @ theta - self.y

    def influence(self) -> NDArray[np.float64]:
        """Exact influence (n_test, n_train) in influx's convention for the summed objective:
        $g_i^\\top H^{-1} g_j$ with $g = 2 x r$ and $H = 2A$."""
        a, theta, r = self._full()
        r_test = self.x_test @ theta - self.y_test
        return 2.0 * (r_test[:, None] * (self.x_test @ np.linalg.solve(a, self.x.T))) * r

    def exact_leave_one_out(self) -> NDArray[np.float64]:
        """Exact loss changes (n_test, n_train) after removing each point, by Sherman-Morrison:
        $\\theta_{-j} = \\theta + A^{-1} x_j r_j / (1 - h_j)$."""
        a, theta, r = self._full()
        a_inv_x = np.linalg.solve(a, self.x.T)  # (d, n)
        leverage = np.einsum("nd,dn->n", self.x, a_inv_x)
        shifts = a_inv_x * (r / (1.0 - leverage))  # (d, n): theta_{-j} - theta
        base = self.x_test @ theta - self.y_test
        moved = base[:, None] + self.x_test @ shifts
        return moved**2 - base[:, None] ** 2

    def leverage(self) -> NDArray[np.float64]:
        a, _, _ = self._full()
        return np.einsum("nd,dn->n", self.x, np.linalg.solve(a, self.x.T))


class TorchRegression:
    """A torch linear model trained by 50 steps of full-batch gradient descent from a seeded
    initialisation; the measurement returns a tensor of test squared errors."""

    def __init__(self, problem: RidgeProblem):
        import torch

        self.x = torch.tensor(problem.x)
        self.y = torch.tensor(problem.y)[:, None]
        self.x_test = torch.tensor(problem.x_test)
        self.y_test = torch.tensor(problem.y_test)[:, None]

    def train(self, indices: NDArray[np.int64], seed: int) -> object:
        import torch

        # a generator of its own: the tasks of a multi-threaded Dask worker run concurrently
        # in one process and would race for torch's global one; an explicit dtype: a
        # worker's default dtype is not the test session's
        generator = torch.Generator().manual_seed(seed)
        net = torch.nn.Linear(self.x.shape[1], 1, dtype=torch.float64)
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.copy_(
                    torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                )
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = self.x[indices], self.y[indices]
        for _ in range(50):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
        return net

    def measure(self, net: object) -> object:
        import torch

        with torch.no_grad():
            return ((net(self.x_test) - self.y_test) ** 2)[:, 0]  # type: ignore[operator]
