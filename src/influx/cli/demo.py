"""`influx demo`: find mislabeled digits by their influence.

The demo trains a small MLP on sklearn's bundled digits data with a known 10% of the training
labels flipped, computes the influence of every training point on a held-out set with
`DirectInfluence`, ranks the training points from most harmful (most negative total influence
on the held-out loss) to most helpful and reports how many flipped labels the ranking finds.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np

from ..evaluation import detection_auc
from .common import echo

logger = logging.getLogger(__name__)


@dataclass
class DemoReport:
    """What the demo found."""

    n_train: int
    n_test: int
    n_flipped: int
    n_parameters: int
    test_accuracy: float
    hits_top10: int
    hits_top20: int
    auc: float
    seconds: float
    influences: Optional[np.ndarray]
    ranking: np.ndarray
    total_influence: np.ndarray
    is_flipped: np.ndarray
    model: Any = None
    data: tuple = ()

    def lines(self) -> List[str]:
        top10 = int(round(0.1 * self.n_train))
        top20 = int(round(0.2 * self.n_train))
        return [
            f"Training points: {self.n_train} ({self.n_flipped} with flipped labels), "
            f"held-out points: {self.n_test}, model parameters: {self.n_parameters}",
            f"Held-out accuracy of the model trained on noisy labels: {self.test_accuracy:.3f}",
            f"Flipped labels among the {top10} most harmful points (top 10%): "
            f"{self.hits_top10}/{self.n_flipped} ({self.hits_top10 / self.n_flipped:.0%})",
            f"Flipped labels among the {top20} most harmful points (top 20%): "
            f"{self.hits_top20}/{self.n_flipped} ({self.hits_top20 / self.n_flipped:.0%})",
            f"Detection AUC (flipped vs clean, by harmfulness): {self.auc:.3f}",
            f"Time (training, fit and ranking): {self.seconds:.1f} s",
        ]


def run_demo(
    seed: int = 0,
    flip_fraction: float = 0.1,
    hidden: int = 16,
    regularization: float = 0.01,
    epochs: int = 300,
    progress: bool = True,
    with_matrix: bool = False,
) -> DemoReport:
    """Train on digits with flipped labels and rank the training points by influence.

    Args:
        seed: seed of the split, the flipped labels and the model's initialisation.
        flip_fraction: the fraction of training labels flipped to another class.
        hidden: the width of the MLP's hidden layer.
        regularization: $\\lambda$ of the influence model.
        epochs: the L-BFGS iterations of training.
        progress: show a progress bar.
        with_matrix: also compute the full (held-out x train) influence matrix.
    """
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    import torch

    from ..torch import DirectInfluence
    from ..torch.workflows.valuation import rank_training_points

    start = time.perf_counter()
    steps = tqdm(total=4, desc="demo", disable=not progress)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_all, y_all = load_digits(return_X_y=True)
    x_all = x_all / 16.0
    perm = rng.permutation(len(x_all))
    n_train = 1200
    train_idx, test_idx = perm[:n_train], perm[n_train:]
    y_train = y_all[train_idx].copy()
    n_flip = int(round(flip_fraction * n_train))
    flipped = rng.choice(n_train, size=n_flip, replace=False)
    y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, size=n_flip)) % 10
    is_flipped = np.zeros(n_train, dtype=bool)
    is_flipped[flipped] = True

    dtype = torch.float64
    xt = torch.tensor(x_all[train_idx], dtype=dtype)
    yt = torch.tensor(y_train, dtype=torch.long)
    xs = torch.tensor(x_all[test_idx], dtype=dtype)
    ys = torch.tensor(y_all[test_idx], dtype=torch.long)

    net = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    ).to(dtype)
    loss = torch.nn.functional.cross_entropy
    steps.set_postfix_str("training")
    optimizer = torch.optim.LBFGS(net.parameters(), max_iter=epochs, line_search_fn="strong_wolfe")
    weight_decay = 1e-3

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss(net(xt), yt) + weight_decay * sum((p**2).sum() for p in net.parameters())
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        accuracy = float((net(xs).argmax(1) == ys).double().mean())
    steps.update()

    steps.set_postfix_str("fitting the Hessian")
    loader = DataLoader(TensorDataset(xt, yt), batch_size=256)
    model = DirectInfluence(net, loss, regularization=regularization).fit(loader)
    steps.update()

    steps.set_postfix_str("ranking")
    ranking = rank_training_points(model, loader, DataLoader(TensorDataset(xs, ys), batch_size=256))
    total = ranking.values.numpy()
    values = model.influences(xs, ys, xt, yt).numpy() if with_matrix else None
    steps.update()

    # Positive influence helps the held-out points; the most harmful are the most negative.
    order = ranking.indices.numpy()
    top10 = order[: int(round(0.1 * n_train))]
    top20 = order[: int(round(0.2 * n_train))]
    report = DemoReport(
        n_train=n_train,
        n_test=len(test_idx),
        n_flipped=n_flip,
        n_parameters=model.n_parameters,
        test_accuracy=accuracy,
        hits_top10=int(is_flipped[top10].sum()),
        hits_top20=int(is_flipped[top20].sum()),
        auc=detection_auc(-total, is_flipped),
        seconds=time.perf_counter() - start,
        influences=values,
        ranking=order,
        total_influence=total,
        is_flipped=is_flipped,
        model=model,
        data=(xs, ys, xt, yt),
    )
    steps.set_postfix_str("done")
    steps.update()
    steps.close()
    return report


def _write(values: np.ndarray, out: Path) -> Path:
    if out.suffix != ".npy":
        out = out.with_suffix(".npy")
    np.save(out, values)
    return out


def write_influences_zarr(
    model: Any,
    x_test: Any,
    y_test: Any,
    x: Any,
    y: Any,
    out: Path,
    chunk_size: int = 256,
    metadata: Optional[dict] = None,
    progress: bool = False,
) -> Path:
    """Write the influence matrix of a fitted model to a zarr array, chunk by chunk.

    Goes through the
    [SequentialInfluenceCalculator][influx.calculator.SequentialInfluenceCalculator], so only
    one chunk is in memory at a time. An interrupted write is completed by the next call
    with the same data and `metadata` (it resumes); an array written with other `metadata`
    is an error.

    Args:
        model: a fitted influence model.
        x_test: test inputs.
        y_test: test targets.
        x: train inputs.
        y: train targets.
        out: the zarr path.
        chunk_size: samples per chunk along both axes.
        metadata: extra attributes that identify the computation (checked on resume).
        progress: show a progress bar.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from ..calculator import SequentialInfluenceCalculator
    from ..torch import TorchNumpyConverter

    lazy = SequentialInfluenceCalculator(model).influences(
        DataLoader(TensorDataset(x_test, y_test), batch_size=chunk_size),
        DataLoader(TensorDataset(x, y), batch_size=chunk_size),
    )
    lazy.metadata.update(metadata or {})
    lazy.to_zarr(str(out), TorchNumpyConverter(), resume=True, progress=progress)
    return out


def plot_report(report: DemoReport, path: Path) -> Path:
    """Write a PNG with the total influence of flipped vs clean training points and the
    detection curve (fraction of flipped labels found vs fraction of points inspected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    total = report.total_influence
    bins = np.linspace(total.min(), total.max(), 50)
    left.hist(total[~report.is_flipped], bins=bins, alpha=0.6, label="clean labels")
    left.hist(total[report.is_flipped], bins=bins, alpha=0.6, label="flipped labels")
    left.set_xlabel("total influence on the held-out loss (negative = harmful)")
    left.set_ylabel("training points")
    left.set_yscale("log")
    left.legend()
    found = np.cumsum(report.is_flipped[report.ranking]) / report.n_flipped
    inspected = np.arange(1, len(found) + 1) / len(found)
    right.plot(inspected, found, label=f"influence ranking (AUC {report.auc:.3f})")
    right.plot([0, 1], [0, 1], "--", color="grey", label="random order")
    right.set_xlabel("fraction of training points inspected (most harmful first)")
    right.set_ylabel("fraction of flipped labels found")
    right.legend(loc="lower right")
    fig.suptitle("influx demo: mislabeled digits found by influence")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


DEMO_DESCRIPTION = (
    "Train a small MLP on sklearn's digits with 10% of the training labels flipped, rank the "
    "training points by their influence on held-out points (DirectInfluence) and report how "
    "many flipped labels the ranking finds."
)


def add_demo_parser(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Register the `demo` subcommand on the subparsers `sub`."""
    demo = sub.add_parser(
        "demo",
        help="find mislabeled digits by their influence",
        description=DEMO_DESCRIPTION,
        parents=list(parents),
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the influence matrix here: a zarr array if PATH ends with .zarr (written "
        "chunk by chunk, resumable), a .npy file otherwise",
    )
    demo.add_argument(
        "--plot",
        type=Path,
        default=Path("influx-demo.png"),
        help="write the plots to this PNG (default: influx-demo.png; needs matplotlib)",
    )
    demo.add_argument("--no-plot", action="store_true", help="do not write the plots")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and the model")
    demo.add_argument(
        "--hidden", type=int, default=16, help="width of the MLP's hidden layer (default: 16)"
    )
    demo.add_argument(
        "--epochs",
        type=int,
        default=300,
        help="L-BFGS iterations of the training (default: 300)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Run `influx demo` with the parsed arguments `args`."""
    to_zarr = args.out is not None and args.out.suffix == ".zarr"
    report = run_demo(
        seed=args.seed,
        hidden=args.hidden,
        epochs=args.epochs,
        progress=not args.no_progress,
        with_matrix=args.out is not None and not to_zarr,
    )
    for line in report.lines():
        echo(line)
    if args.out is not None:
        if to_zarr:
            x_test, y_test, x, y = report.data
            path = write_influences_zarr(
                report.model,
                x_test,
                y_test,
                x,
                y,
                out=args.out,
                metadata={"source": f"influx demo --seed {args.seed}"},
                progress=not args.no_progress,
            )
            shape = (len(x_test), len(x))
        else:
            assert report.influences is not None
            path = _write(report.influences, args.out)
            shape = report.influences.shape
        echo(f"Influence matrix {shape} written to {path}")
    if not args.no_plot:
        try:
            plot_path = plot_report(report, args.plot)
        except ImportError:
            logger.info("Plots skipped: install matplotlib (pip install 'influx[plot]').")
        else:
            echo(f"Plots written to {plot_path}")
    return 0
