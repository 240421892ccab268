"""First-call cost: the time of the first `influences()` call in a fresh process.

For each method, a fresh interpreter imports influx, fits the model on the digits-sized MLP
(64-32-10, random weights, 1,000 training points) and times three `influences()` calls of a
64 x 1,000 matrix: the first one pays the one-time set-up of whatever the call uses for the
first time in the process (for `torch.func`: the import of `torch._dynamo`, which
`torch.func.grad` needs), the later ones do not. One torch thread.

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_first_call.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Dict, List

METHODS = ["EkfacInfluence", "DirectInfluence", "CgInfluence", "ArnoldiInfluence"]


def child(method: str) -> Dict[str, float]:
    start = time.perf_counter()
    from torch.utils.data import DataLoader, TensorDataset

    import influx.torch as it
    import torch

    imported = time.perf_counter() - start
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).eval()
    x, y = torch.randn(1000, 64), torch.randint(0, 10, (1000,))
    loss = torch.nn.functional.cross_entropy
    builders = {
        "EkfacInfluence": lambda: it.EkfacInfluence(
            model, update_diagonal=True, hessian_regularization=0.1
        ),
        "DirectInfluence": lambda: it.DirectInfluence(model, loss, regularization=0.1),
        "CgInfluence": lambda: it.CgInfluence(
            model, loss, regularization=0.1, maxiter=5, warn_on_max_iteration=False
        ),
        "ArnoldiInfluence": lambda: it.ArnoldiInfluence(model, loss, regularization=0.1, rank=10),
    }
    influence = builders[method]()
    start = time.perf_counter()
    influence.fit(DataLoader(TensorDataset(x, y), batch_size=256))
    fit = time.perf_counter() - start
    calls: List[float] = []
    for _ in range(3):
        start = time.perf_counter()
        influence.influences(x[:64], y[:64], x, y)
        calls.append(time.perf_counter() - start)
    return {
        "import": imported,
        "fit": fit,
        "first": calls[0],
        "later": statistics.median(calls[1:]),
        "dynamo": float("torch._dynamo" in sys.modules),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per method")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    print("| method | import s | fit s | first influences() s | later calls s | torch.func used |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        runs = []
        for _ in range(args.repeats):
            output = subprocess.run(
                [sys.executable, __file__, "--child", method],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(output.stdout.strip().splitlines()[-1]))

        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            f"| {method} | {median['import']:.2f} | {median['fit']:.3f} | {median['first']:.3f} "
            f"| {median['later']:.3f} | {'yes' if median['dynamo'] else 'no'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
