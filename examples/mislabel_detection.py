"""Find mislabeled training points by their influence on a held-out set.

Flips 10% of the training labels of sklearn's digits, trains a small MLP, and ranks the
training points by their total influence on the held-out loss: harmful points (negative
influence) first. Run: `python examples/mislabel_detection.py`.
"""

from __future__ import annotations

import logging

import numpy as np
from _common import digits, train_mlp
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.torch import DirectInfluence, rank_training_points

logger = logging.getLogger("mislabel_detection")


def main(n_train: int = 1200, flip_fraction: float = 0.1, seed: int = 0) -> float:
    """Run the example; return the fraction of flipped labels among the most harmful 10%."""
    x, y, x_val, y_val = digits(n_train, seed)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(n_train, size=int(flip_fraction * n_train), replace=False)
    y = y.clone()
    y[flipped] = (y[flipped] + torch.as_tensor(rng.integers(1, 10, len(flipped)))) % 10

    net = train_mlp(x, y)
    train = DataLoader(TensorDataset(x, y), batch_size=256)
    model = DirectInfluence(net, torch.nn.functional.cross_entropy, regularization=0.01)
    model.fit(train)
    ranking = rank_training_points(model, train, DataLoader(TensorDataset(x_val, y_val), 256))

    inspected = ranking.most_harmful(int(0.1 * n_train)).numpy()
    found = np.isin(flipped, inspected).mean()
    logger.info("Flipped labels among the 10%% most harmful points: %.0f%%", 100 * found)
    for index in inspected[:5]:
        logger.info(
            "training point %4d: label %d, total influence %.1f%s",
            index,
            int(y[index]),
            float(ranking.values[index]),
            " (flipped)" if index in flipped else "",
        )
    return float(found)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
