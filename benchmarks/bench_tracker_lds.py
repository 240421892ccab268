r"""Checkpoint-averaged influence against final-model influence: the linear datamodeling score.

The training run of `examples/tracker_digits.py` (digits, 1,200 training points, a 64-32-10
float64 MLP, Adam, batches of 64, 10 epochs, 10% flipped labels) is tracked by an
`InfluenceTracker` that keeps 5 checkpoints (every other epoch). Its rankings give each
training point a total influence $T_j$ on the validation loss:

* EK-FAC and the direct (exact Gauss-Newton) influence on the final model;
* the same models averaged over the 5 checkpoints;
* TracIn-CP over the 5 checkpoints.

The linear datamodeling score (LDS) checks the additive prediction they make: for `--subsets`
random halves $S_m$ of the training set, the same loop (same initialisation, same epochs)
retrains on $S_m$ and its total validation loss $L_m$ is measured; the LDS is the Spearman
correlation between the predicted $\sum_{j \in S_m} T_j$ (positive: helpful points kept) and
$-L_m$. The table also gives the detection AUC of the flipped labels.

Usage (from the repository root): `PYTHONPATH=src python benchmarks/bench_tracker_lds.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, TensorDataset

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _common import digits  # noqa: E402

from influx.torch import HarmfulRanking, InfluenceTracker  # noqa: E402
from influx.torch.workflows.tracker_report import detection_auc  # noqa: E402


def data(seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    x, y, x_val, y_val = digits(1200, seed)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(1200, size=120, replace=False)
    y = y.clone()
    y[flipped] = (y[flipped] + torch.as_tensor(rng.integers(1, 10, len(flipped)))) % 10
    return x, y, x_val, y_val, flipped


def train(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    tracker_of: Optional[object] = None,
) -> Tuple[torch.nn.Module, Optional[InfluenceTracker]]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    tracker = tracker_of(net, optimizer) if callable(tracker_of) else None
    net.train()
    for _ in range(epochs):
        for x_batch, y_batch in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x_batch), y_batch).backward()
            optimizer.step()
            if tracker is not None:
                tracker.on_step()
        if tracker is not None:
            tracker.on_epoch_end()
    return net.eval(), tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, x_val, y_val, flipped = data(args.seed)
    ordered = DataLoader(TensorDataset(x, y), batch_size=256)
    validation = DataLoader(TensorDataset(x_val, y_val), batch_size=256)

    def tracker_of(method: str):  # type: ignore[no-untyped-def]
        def make(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> InfluenceTracker:
            return InfluenceTracker(
                net,
                F.cross_entropy,
                ordered,
                validation,
                method=method,
                regularization=0.01,
                method_options={"second_order_mode": "gauss_newton"} if method == "direct" else {},
                checkpoint_every=2,
                learning_rate=optimizer,
            )

        return make

    values: Dict[str, torch.Tensor] = {}
    for method, label in (("ekfac", "EK-FAC"), ("direct", "direct (Gauss-Newton)")):
        start = time.process_time()
        _, tracker = train(x, y, args.epochs, args.seed, tracker_of(method))
        assert tracker is not None
        values[f"{label}, final model"] = tracker.rank(None).values
        values[f"{label}, average of {len(tracker.checkpoints)} checkpoints"] = tracker.rank(
            "influence"
        ).values
        if method == "ekfac":
            values[f"TracIn-CP, {len(tracker.checkpoints)} checkpoints"] = tracker.rank(
                "tracin"
            ).values
        print(f"{label}: rankings in {time.process_time() - start:.1f} s CPU", file=sys.stderr)

    rng = np.random.default_rng(args.seed + 100)
    masks: List[np.ndarray] = []
    losses: List[float] = []
    for m in range(args.subsets):
        mask = np.zeros(len(y), dtype=bool)
        mask[rng.choice(len(y), size=len(y) // 2, replace=False)] = True
        net, _ = train(x[mask], y[mask], args.epochs, args.seed)
        with torch.no_grad():
            losses.append(float(F.cross_entropy(net(x_val), y_val, reduction="sum")))
        masks.append(mask)
        print(f"subset {m + 1}/{args.subsets}", end="\r", file=sys.stderr)
    subset_matrix = np.stack(masks).astype(np.float64)
    print(
        f"{args.epochs} epochs, {args.subsets} random halves, seed {args.seed}; LDS = Spearman "
        "correlation of the predicted total influence of the kept points with minus the "
        "retrained validation loss"
    )
    print("| ranking | LDS | flipped-label detection AUC |")
    print("|---|---|---|")
    for name, total in values.items():
        predicted = subset_matrix @ total.detach().numpy()
        lds = spearmanr(predicted, -np.asarray(losses)).statistic
        order = torch.argsort(total, stable=True)
        auc = detection_auc(HarmfulRanking(order, total), flipped)
        print(f"| {name} | {lds:.3f} | {auc:.3f} |")


if __name__ == "__main__":
    main()
