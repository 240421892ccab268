"""InfluenceTracker: the overhead on training time, with and without the gradient store.

Two workloads on sklearn's digits (1,200 training points, float32, Adam, batches of 64,
`--epochs` epochs): the 64-32-10 tanh MLP (2,410 parameters) and a small CNN on the 8 x 8
images (conv 1-8-3, conv 8-16-3, linear 256-10; 4,346 parameters). The same loop is timed

* without the tracker (the baseline);
* with the tracker counting steps and epochs and keeping a checkpoint every epoch in memory;
* with the gradient store recording the projected gradients (Kronecker projection,
  `--projection-dim`, 256 by default) of the steps' batches: in the last epoch only (the
  default schedule, captured from the training step's passes), or in every epoch, captured
  or by the tracker's own pass.

Each configuration runs `--repeats` times, interleaved with the others, in one process, with
one torch thread and with torch's default number of threads (`--threads`); the tables report
the median CPU time of the training loop (process time: less sensitive than wall time to other
processes on a shared machine) and the median wall time, each with its ratio to the
baseline's median of the same run. The end of training is timed separately: the EK-FAC
ranking of `finish()` and the opening of the store (writing zarr and fitting the projected
curvature).

Usage (from the repository root): `PYTHONPATH=src python benchmarks/bench_tracker.py`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.torch import InfluenceTracker

N_TRAIN = 1200
BATCH = 64


def digits(image: bool) -> Tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x = torch.tensor(x[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[perm], dtype=torch.long)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    )


WORKLOADS: Dict[str, Tuple[Callable[[], torch.nn.Module], bool]] = {
    "digits MLP": (mlp, False),
    "digits CNN": (cnn, True),
}


def train(
    workload: str, epochs: int, config: Optional[Dict[str, Any]], directory: Path
) -> Tuple[float, float, Optional[InfluenceTracker]]:
    """Train once; return the training's CPU and wall time (s) and the tracker."""
    build, image = WORKLOADS[workload]
    x, y, x_val, y_val = digits(image)
    torch.manual_seed(0)
    net = build()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(torch.arange(N_TRAIN), x, y), batch_size=BATCH, shuffle=True)
    tracker = None
    record = False
    if config is not None:
        options = dict(config)
        record = "gradient_store_options" in options
        if record:
            options["gradient_store"] = directory / "grads.zarr"
            options["epochs"] = epochs
        tracker = InfluenceTracker(
            net,
            F.cross_entropy,
            DataLoader(TensorDataset(x, y), batch_size=256),
            DataLoader(TensorDataset(x_val, y_val), batch_size=256),
            method="ekfac",
            regularization=0.01,
            learning_rate=optimizer,
            **options,
        )
    net.train()
    start, wall = time.process_time(), time.perf_counter()
    for _ in range(epochs):
        for index, x_batch, y_batch in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x_batch), y_batch).backward()
            optimizer.step()
            if tracker is not None:
                if record:
                    tracker.on_step(batch=(x_batch, y_batch), indices=index)
                else:
                    tracker.on_step()
        if tracker is not None:
            tracker.on_epoch_end()
    return time.process_time() - start, time.perf_counter() - wall, tracker


def configs(epochs: int, dim: int) -> Dict[str, Optional[Dict[str, Any]]]:
    store = {"gradient_store_options": {"projection_dim": dim, "regularization": 0.01}}
    return {
        "no tracker": None,
        "tracker, checkpoint every epoch": {"checkpoint_every": 1},
        "gradient store, last epoch (default), captured": dict(store),
        "gradient store, every step, captured": {**store, "gradient_store_from_epoch": 0},
        "gradient store, every step, own passes": {
            **store,
            "gradient_store_from_epoch": 0,
            "gradient_store_capture": False,
        },
    }


def measure(workload: str, args: argparse.Namespace) -> List[str]:
    """The table rows of one workload at the current number of threads."""
    cases = configs(args.epochs, args.projection_dim)
    cpu: Dict[str, List[float]] = {name: [] for name in cases}
    wall: Dict[str, List[float]] = {name: [] for name in cases}
    end: Dict[str, List[float]] = {"finish (EK-FAC ranking)": [], "store (write + fit)": []}
    with tempfile.TemporaryDirectory() as directory:
        train(workload, 1, None, Path(directory))  # warm-up
        for _ in range(args.repeats):
            for name, config in cases.items():
                seconds, elapsed, tracker = train(workload, args.epochs, config, Path(directory))
                cpu[name].append(seconds)
                wall[name].append(elapsed)
                if tracker is not None and tracker.gradient_store is not None:
                    start = time.process_time()
                    assert tracker.recorder is not None
                    tracker.recorder.store(tracker.train_loader)
                    end["store (write + fit)"].append(time.process_time() - start)
                elif tracker is not None:
                    start = time.process_time()
                    tracker.finish()
                    end["finish (EK-FAC ranking)"].append(time.process_time() - start)
    baseline = statistics.median(cpu["no tracker"])
    baseline_wall = statistics.median(wall["no tracker"])
    rows = []
    for name in cases:
        median, median_wall = statistics.median(cpu[name]), statistics.median(wall[name])
        rows.append(
            f"| {workload} | {name} | {median:.2f} s | {100 * (median / baseline - 1):+.0f} % | "
            f"{median_wall:.2f} s | {100 * (median_wall / baseline_wall - 1):+.0f} % |"
        )
    for name, values in end.items():
        median = statistics.median(values)
        rows.append(
            f"| {workload} | end of training: {name} | {median:.2f} s | "
            f"{100 * median / baseline:.0f} % of training | | |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=[1, torch.get_num_threads()],
        help="torch thread counts to run (default: 1 and torch's default)",
    )
    args = parser.parse_args()
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = [row for workload in WORKLOADS for row in measure(workload, args)]
        print(
            f"\n{args.epochs} epochs, median of {args.repeats} runs, {threads} torch thread(s), "
            f"projection dimension {args.projection_dim}"
        )
        print("| workload | configuration | CPU time | overhead | wall time | overhead |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
