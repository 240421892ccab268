r"""Ranks with ties, Spearman correlations and the detection AUC, in numpy.

The rank of a value is its 1-based position in sorted order; tied values share the mean of
the positions they occupy (the "average" method of `scipy.stats.rankdata`). The Spearman
correlation of two samples is the Pearson correlation of their ranks,

$$
\rho(a, b) = \frac{\sum_m (r_m - \bar r)(s_m - \bar s)}
{\sqrt{\sum_m (r_m - \bar r)^2 \sum_m (s_m - \bar s)^2}}, \qquad r = \mathrm{rank}(a),\;
s = \mathrm{rank}(b),
$$

undefined when either sample is constant.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np
from numpy.typing import NDArray

from .checks import as_array, as_finite_float

__all__ = ["average_ranks", "detection_auc", "spearman_rows"]


def average_ranks(values: NDArray) -> NDArray[np.float64]:
    """The ranks of each row of `values` (a 2-d array) along its last axis, ties averaged.

    Args:
        values: array of shape `(n_rows, n)`.

    Returns:
        Float64 array of the same shape: in each row, ranks from 1 to `n`, tied values
        sharing the mean of their positions.
    """
    n_rows, n = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    positions = np.broadcast_to(np.arange(n), (n_rows, n))
    new_group = np.ones((n_rows, n), dtype=bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends_group = np.ones((n_rows, n), dtype=bool)
    ends_group[:, :-1] = new_group[:, 1:]
    # first and last position of each value's group of ties, spread over the group
    first = np.maximum.accumulate(np.where(new_group, positions, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends_group, positions, n)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((n_rows, n), dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def spearman_rows(a: NDArray, b: NDArray) -> Tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """The Spearman correlation of each row of `a` with the same row of `b`.

    Args:
        a: array of shape `(n_rows, n)`.
        b: array of the same shape.

    Returns:
        `(rho, defined)`: the correlations, shape `(n_rows,)`, and whether each is defined. A
        row where `a` or `b` is constant has no correlation: its `rho` is 0 and its `defined`
        False.
    """
    ra = average_ranks(a)
    rb = average_ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm_a = np.sqrt(np.einsum("ij,ij->i", ra, ra))
    norm_b = np.sqrt(np.einsum("ij,ij->i", rb, rb))
    # constant rows have all ranks equal: centred ranks exactly 0
    defined = (norm_a > 0) & (norm_b > 0)
    rho = np.zeros(a.shape[0], dtype=np.float64)
    covariance = np.einsum("ij,ij->i", ra, rb)
    rho[defined] = covariance[defined] / (norm_a[defined] * norm_b[defined])
    return np.clip(rho, -1.0, 1.0), defined


def detection_auc(values: Any, flagged: Any) -> float:
    r"""Area under the ROC curve of `values` as a detector of the `flagged` points.

    The probability that a flagged point has a larger value than an unflagged one, ties
    counting 1/2 (the Mann-Whitney statistic):

    $$
    \mathrm{AUC} = \frac{1}{n_+ n_-}\sum_{i \in +}\sum_{j \in -}
    \left([v_i > v_j] + \tfrac12 [v_i = v_j]\right)
    = \frac{\sum_{i \in +} \mathrm{rank}(v_i) - n_+(n_+ + 1)/2}{n_+ n_-} .
    $$

    To detect harmful training points by influence, pass `values = -total_influence` (the
    most harmful have the most negative influence).

    Args:
        values: shape `(n,)`, finite; larger means "more likely flagged".
        flagged: boolean mask of shape `(n,)` with at least one flagged and one unflagged
            point.

    Returns:
        The AUC in [0, 1]: 1 when every flagged point scores above every other, 1/2 for a
        random score.

    Raises:
        ValueError: for a `values` that is not 1-d or not finite, a `flagged` that is not a
            boolean mask of the same length, or without both classes.
    """
    scores = as_finite_float(values, "values", 1)
    mask = as_array(flagged, "flagged")
    if mask.dtype != np.bool_:
        raise ValueError(
            f"Parameter 'flagged' must be a boolean mask (dtype bool), got dtype {mask.dtype}."
        )
    if mask.shape != scores.shape:
        raise ValueError(
            f"Parameter 'flagged' must have the shape of 'values' {scores.shape}, got {mask.shape}."
        )
    n_flagged = int(mask.sum())
    n_other = len(mask) - n_flagged
    if n_flagged == 0 or n_other == 0:
        raise ValueError(
            "Parameter 'flagged' must mark at least one point and leave at least one "
            f"unmarked, got {n_flagged} flagged of {len(mask)}."
        )
    ranks = average_ranks(scores[None, :])[0]
    return float((ranks[mask].sum() - n_flagged * (n_flagged + 1) / 2) / (n_flagged * n_other))
