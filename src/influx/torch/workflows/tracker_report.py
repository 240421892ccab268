r"""What a training-loop tracker writes and logs about a ranking of training points.

A report directory holds

* `ranking.csv`: one row per training point, most harmful first: its rank, training index,
  total influence $T_j = \sum_i I(z'_i, z_j)$ on the validation set and, when suspected
  points were marked, whether it is one of them;
* `summary.json`: when and how the ranking was made, the most harmful points, the solver
  diagnostics and, with suspected points, the area under the detection curve;
* `influence_distribution.png`: a histogram of $T_j$ (needs matplotlib, the `plot` extra);
* with suspected points, `detection_curve.csv` and `detection_curve.png`: the fraction of the
  suspected points found among the $k$ most harmful points, against $k / n$.

The detection AUC is the probability that a suspected point is ranked above (more harmful
than) an unsuspected one,

$$
\text{AUC} = \frac{1}{n_s n_c} \sum_{j \in S} \sum_{l \notin S} \mathbf{1}[T_j < T_l]
$$

(ties count one half), the area under the ROC curve of the score $-T_j$.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

import torch

from .valuation import HarmfulRanking

__all__ = ["as_index_list", "detection_auc", "detection_curve", "log_summary", "write_report"]

logger = logging.getLogger(__name__)


def _suspected_mask(suspected: Sequence[int], n: int) -> np.ndarray:
    indices = np.asarray(list(suspected), dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(
            f"Parameter 'suspected' must hold training indices in [0, {n}), got indices "
            f"from {int(indices.min())} to {int(indices.max())}."
        )
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return mask


def detection_curve(ranking: HarmfulRanking, suspected: Sequence[int]) -> np.ndarray:
    """The fraction of `suspected` points among the `k` most harmful, for `k = 1..n`.

    Returns:
        An array `(n, 2)`: the fraction of the training points inspected, `k / n`, and the
        fraction of the suspected points found among them.
    """
    n = int(ranking.values.shape[0])
    mask = _suspected_mask(suspected, n)
    if not mask.any():
        raise ValueError("Parameter 'suspected' must name at least one training point, got none.")
    found = np.cumsum(mask[ranking.indices.cpu().numpy()]) / mask.sum()
    return np.stack([np.arange(1, n + 1) / n, found], axis=1)


def detection_auc(ranking: HarmfulRanking, suspected: Sequence[int]) -> float:
    """The area under the ROC curve of finding `suspected` points by the score $-T_j$."""
    values = ranking.values.detach().cpu().double().numpy()
    mask = _suspected_mask(suspected, len(values))
    n_pos, n_neg = int(mask.sum()), int((~mask).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "Parameter 'suspected' must name some but not all training points, got "
            f"{n_pos} of {len(values)}."
        )
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values))
    sorted_scores = -values[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[mask].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _diagnostics(ranking: HarmfulRanking) -> Dict[str, Optional[Dict[str, Any]]]:
    result: Dict[str, Optional[Dict[str, Any]]] = {}
    for name, diagnostics in (ranking.solver_diagnostics or {}).items():
        if diagnostics is None:
            result[name] = None
            continue
        entry = asdict(diagnostics)
        entry["details"] = {k: v for k, v in entry["details"].items() if _is_json(v)}
        result[name] = entry
    return result


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def log_summary(
    ranking: HarmfulRanking, top_k: int, context: str, suspected: Optional[Sequence[int]] = None
) -> None:
    """Log the most harmful points, the solvers' diagnostics and the detection AUC."""
    k = min(top_k, int(ranking.indices.shape[0]))
    worst = ranking.most_harmful(k).tolist()
    values = [float(v) for v in ranking.values[ranking.most_harmful(k)]]
    logger.info(
        "Influence ranking %s: %d training points; most harmful %s with total influence %s.",
        context,
        int(ranking.values.shape[0]),
        worst,
        [f"{v:.3g}" for v in values],
    )
    for name, diagnostics in (ranking.solver_diagnostics or {}).items():
        if diagnostics is not None:
            figures = "".join(
                f", {label} {value:.3g}"
                for label, value in (
                    ("iterations", diagnostics.iterations),
                    ("residual", diagnostics.residual),
                )
                if value is not None
            )
            logger.info(
                "  solver %s on block %s: converged %s%s.",
                diagnostics.method,
                name,
                diagnostics.converged,
                figures,
            )
    if not ranking.converged:
        logger.warning("Influence ranking %s: a solve did not converge.", context)
    if suspected is not None:
        logger.info(
            "  detection of the %d suspected points: AUC %.3f.",
            len(suspected),
            detection_auc(ranking, suspected),
        )


def write_report(
    ranking: HarmfulRanking,
    directory: Union[str, Path],
    info: Mapping[str, Any],
    suspected: Optional[Sequence[int]] = None,
    top_k: int = 10,
    plots: bool = True,
) -> Path:
    """Write the ranking CSV, the summary, the distribution plot and, with `suspected`
    points, the detection curve into `directory` (created if needed); return it.

    The plots are skipped with `plots=False`, and with a warning when matplotlib is not
    installed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    values = ranking.values.detach().cpu().double().numpy()
    order = ranking.indices.cpu().numpy()
    mask = None if suspected is None else _suspected_mask(suspected, len(values))
    with open(directory / "ranking.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["rank", "index", "influence"] + ([] if mask is None else ["suspected"]))
        for rank, index in enumerate(order):
            row: List[Any] = [rank, int(index), repr(float(values[index]))]
            writer.writerow(row + ([] if mask is None else [int(mask[index])]))
    k = min(top_k, len(order))
    summary: Dict[str, Any] = {
        **info,
        "n_train": len(values),
        "converged": ranking.converged,
        "most_harmful": [{"index": int(i), "influence": float(values[i])} for i in order[:k]],
        "solver_diagnostics": _diagnostics(ranking),
    }
    curve = None
    if suspected is not None:
        curve = detection_curve(ranking, suspected)
        summary["detection_auc"] = detection_auc(ranking, suspected)
        summary["n_suspected"] = int(np.asarray(mask).sum())
        np.savetxt(
            directory / "detection_curve.csv",
            curve,
            delimiter=",",
            header="fraction_inspected,fraction_found",
            comments="",
        )
    (directory / "summary.json").write_text(json.dumps(summary, indent=2))
    if plots:
        _plot(directory, values, mask, curve)
    return directory


def _plot(
    directory: Path, values: np.ndarray, mask: Optional[np.ndarray], curve: Optional[np.ndarray]
) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install influx[plot]): no plots.")
        return
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    bins = np.histogram_bin_edges(values, bins=min(50, max(10, len(values) // 10))).tolist()
    if mask is None:
        axes.hist(values, bins=bins, color="tab:blue")
    else:
        axes.hist(values[~mask], bins=bins, color="tab:blue", alpha=0.7, label="other")
        axes.hist(values[mask], bins=bins, color="tab:red", alpha=0.7, label="suspected")
        axes.legend()
    axes.set_xlabel("total influence on the validation set (negative: harmful)")
    axes.set_ylabel("training points")
    figure.tight_layout()
    figure.savefig(directory / "influence_distribution.png", dpi=100)
    if curve is not None:
        figure = Figure(figsize=(5, 4))
        axes = figure.add_subplot()
        axes.plot(curve[:, 0], curve[:, 1], color="tab:red", label="ranking")
        axes.plot([0, 1], [0, 1], color="gray", linestyle="--", label="random order")
        axes.set_xlabel("fraction of training points inspected, most harmful first")
        axes.set_ylabel("fraction of suspected points found")
        axes.legend()
        figure.tight_layout()
        figure.savefig(directory / "detection_curve.png", dpi=100)


def as_index_list(suspected: Optional[Sequence[int]]) -> Optional[List[int]]:
    """`suspected` as a list of ints (accepts tensors and arrays), or None."""
    if suspected is None:
        return None
    if isinstance(suspected, torch.Tensor):
        return [int(i) for i in suspected.flatten().tolist()]
    try:
        return [int(i) for i in np.asarray(suspected).ravel()]
    except (TypeError, ValueError):
        raise TypeError(
            "Parameter 'suspected' must be a sequence of training indices, got "
            f"{type(suspected).__name__}."
        ) from None
