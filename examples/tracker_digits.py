"""Rank harmful training points from a plain PyTorch training loop, as the model trains.

A 64-32-10 MLP learns sklearn's digits with 10% of the training labels flipped, in an
ordinary loop: shuffled mini-batches, Adam, a few epochs. An `InfluenceTracker` is told about
the steps and epochs; it keeps a checkpoint of the parameters every other epoch and, at the
end, ranks the training points by their total influence on a held-out set with EK-FAC on the
final model, logs the most harmful points and writes a report (ranking CSV, summary, plots,
the detection curve of the flipped labels). The same checkpoints then give TracIn-CP and the
EK-FAC ranking averaged over the checkpoints. The detection of the flipped labels is scored
by the area under the ROC curve.

The training is the same as without the tracker (same weights, to the bit).

Run: `python examples/tracker_digits.py [report directory]`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch.nn.functional as F
from _common import digits
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.torch import InfluenceTracker
from influx.torch.workflows.tracker_report import detection_auc

logger = logging.getLogger("tracker_digits")


def main(
    epochs: int = 10,
    n_train: int = 1200,
    flip_fraction: float = 0.1,
    seed: int = 0,
    report_dir: Optional[Path] = None,
) -> Dict[str, float]:
    """Train with the tracker; return the detection AUC of each ranking and the accuracy."""
    x, y, x_val, y_val = digits(n_train, seed)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(n_train, size=int(flip_fraction * n_train), replace=False)
    y = y.clone()
    y[flipped] = (y[flipped] + torch.as_tensor(rng.integers(1, 10, len(flipped)))) % 10

    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-4)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    tracker = InfluenceTracker(
        net,
        F.cross_entropy,
        DataLoader(TensorDataset(x, y), batch_size=256),  # the ranking's order: no shuffling
        DataLoader(TensorDataset(x_val, y_val), batch_size=256),
        method="ekfac",
        regularization=0.01,
        checkpoint_every=2,
        learning_rate=optimizer,
        suspected=flipped,
        report_dir=report_dir,
    )
    net.train()
    for _ in range(epochs):
        for x_batch, y_batch in shuffled:
            optimizer.zero_grad()
            F.cross_entropy(net(x_batch), y_batch).backward()
            optimizer.step()
            tracker.on_step()
        tracker.on_epoch_end()
    net.eval()
    accuracy = float((net(x_val).argmax(1) == y_val).double().mean())
    logger.info("Validation accuracy: %.0f%%", 100 * accuracy)

    rankings = {
        "EK-FAC, final model": tracker.finish(),
        "TracIn-CP": tracker.rank("tracin"),
        "EK-FAC, checkpoint average": tracker.rank("influence"),
    }
    result = {"accuracy": accuracy}
    for name, ranking in rankings.items():
        result[name] = detection_auc(ranking, flipped)
        logger.info(
            "%s over %d checkpoints: flipped-label detection AUC %.3f",
            name,
            len(tracker.checkpoints),
            result[name],
        )
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(report_dir=Path(sys.argv[1]) if len(sys.argv) > 1 else None)
