"""LDS on sklearn's digits: DirectInfluence on a logistic regression and a 64-32-10 MLP over a
grid of lambda, and ensembles of 1, 3 and 5 MLPs trained from different seeds.

Protocol: 500 training and 100 test points (a fixed permutation), M half-subsets drawn by
`retrain_on_subsets` (subset_seed 0), each retrained by L-BFGS (300 iterations, strong Wolfe)
on the mean cross-entropy plus a weight decay mu |theta|^2, mu = 1e-3, from each training
seed; the ground truth is the test cross-entropy averaged over the seeds. The influence is
computed on the model trained on all points with seed 0 (an ensemble of k uses seeds 0..k-1)
at lambda = 2 mu + delta (2 mu is the Hessian of the weight decay), for delta in a grid.

    PYTHONPATH=src python benchmarks/evaluation_digits.py --subsets 50 --seeds 3 \
        --store-dir /tmp/lds-digits

The ground truth is written to zarr stores in --store-dir: a second run reuses it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.evaluation import retrain_on_subsets
from influx.torch import DirectInfluence, EnsembleInfluence

DECAY = 1e-3
DELTAS = (1e-4, 1e-3, 1e-2, 1e-1)


class Digits:
    """The data, a model factory, train_fn and measure_fn (picklable for Dask)."""

    def __init__(self, kind: str, n_train: int = 500, n_test: int = 100):
        x, y = load_digits(return_X_y=True)
        perm = np.random.default_rng(0).permutation(len(x))
        self.kind = kind
        self.x = torch.tensor(x[perm[:n_train]] / 16.0, dtype=torch.float64)
        self.y = torch.tensor(y[perm[:n_train]])
        self.x_test = torch.tensor(x[perm[n_train : n_train + n_test]] / 16.0, dtype=torch.float64)
        self.y_test = torch.tensor(y[perm[n_train : n_train + n_test]])

    def make(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        if self.kind == "logreg":
            return torch.nn.Linear(64, 10).double()
        return torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        ).double()

    def train(self, indices: np.ndarray, seed: int) -> torch.nn.Module:
        net = self.make(seed)
        x, y = self.x[indices], self.y[indices]
        optimizer = torch.optim.LBFGS(
            net.parameters(),
            max_iter=300,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = torch.nn.functional.cross_entropy(net(x), y) + DECAY * sum(
                (p**2).sum() for p in net.parameters()
            )
            value.backward()
            return value

        optimizer.step(closure)
        return net

    def measure(self, net: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(
                net(self.x_test), self.y_test, reduction="none"
            )
        return losses.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per subset")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--store-dir", type=Path, default=Path("lds-digits"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.store_dir.mkdir(parents=True, exist_ok=True)
    rows: List[str] = []
    for kind in ("logreg", "mlp"):
        problem = Digits(kind)
        start = time.perf_counter()
        truth = retrain_on_subsets(
            problem.train,
            problem.measure,
            len(problem.x),
            n_subsets=args.subsets,
            seeds=tuple(range(args.seeds)),
            store=args.store_dir / f"{kind}-{args.subsets}x{args.seeds}.zarr",
            progress=False,
        )
        print(f"{kind}: ground truth in {time.perf_counter() - start:.0f} s", flush=True)
        loader = DataLoader(TensorDataset(problem.x, problem.y), batch_size=250)
        sizes = [1] if kind == "logreg" else args.members
        fitted = [
            DirectInfluence(
                problem.train(np.arange(len(problem.x)), seed),
                torch.nn.functional.cross_entropy,
                regularization=2 * DECAY + DELTAS[0],
            ).fit(loader)
            for seed in range(max(sizes))
        ]
        for delta in DELTAS:
            members = [m.with_regularization(2 * DECAY + delta) for m in fitted]
            scores: Dict[int, float] = {}
            for k in sizes:
                ensemble = EnsembleInfluence(members[:k])
                values = ensemble.influences(problem.x_test, problem.y_test, problem.x, problem.y)
                scores[k] = truth.lds(values).mean
            cells = " | ".join(f"{scores[k]:.3f}" for k in sizes)
            rows.append(f"| {kind} | 2e-3 + {delta:g} | {cells} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
