"""Which training points made the model misclassify this test digit?

Trains a small MLP on sklearn's digits, picks a misclassified held-out digit, and shows it
next to the training digits with the most helpful and most harmful influence on its loss
(`top_k_influences`, streamed over the training data). Writes `misclassified_point.png`.
Run: `python examples/misclassified_point.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from _common import digits, train_mlp
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.torch import DirectInfluence, top_k_influences

logger = logging.getLogger("misclassified_point")


def main(n_train: int = 1200, k: int = 5, out: Path = Path("misclassified_point.png")) -> Path:
    """Run the example and return the path of the figure."""
    x, y, x_test, y_test = digits(n_train)
    net = train_mlp(x, y)
    with torch.no_grad():
        predicted = net(x_test).argmax(1)
    wrong = torch.nonzero(predicted != y_test).flatten()
    index = int(wrong[0]) if len(wrong) else 0
    logger.info(
        "Test digit %d: label %d, predicted %d", index, int(y_test[index]), int(predicted[index])
    )

    model = DirectInfluence(net, torch.nn.functional.cross_entropy, regularization=0.01)
    model.fit(DataLoader(TensorDataset(x, y), batch_size=256))
    top = top_k_influences(
        model,
        x_test[index : index + 1],
        y_test[index : index + 1],
        DataLoader(TensorDataset(x, y), batch_size=256),
        k=k,
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, k + 1, figsize=(1.8 * (k + 1), 4))
    for row in axes:
        for ax in row:
            ax.axis("off")
    axes[0, 0].imshow(x_test[index].reshape(8, 8).numpy(), cmap="gray_r")
    axes[0, 0].set_title(f"test: {int(y_test[index])}\npredicted {int(predicted[index])}")
    rows = [
        ("helps", top.helpful_indices[0], top.helpful_values[0]),
        ("hurts", top.harmful_indices[0], top.harmful_values[0]),
    ]
    for r, (what, indices, values) in enumerate(rows):
        for c, (i, v) in enumerate(zip(indices.tolist(), values.tolist()), start=1):
            axes[r, c].imshow(x[i].reshape(8, 8).numpy(), cmap="gray_r")
            axes[r, c].set_title(f"{what}: {int(y[i])}\n{v:+.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    logger.info("Most harmful training points: %s", top.harmful_indices[0].tolist())
    logger.info("Figure written to %s", out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
