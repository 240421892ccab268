r"""The linear datamodeling score (LDS): do influence scores predict retraining?

Given $M$ subsets $S_1, \dots, S_M$ of the training data, the measured test losses
$y_{m,i}$ of models retrained on each subset, and influence scores $I_{ij}$ in influx's
convention (positive: training point $j$ helps test point $i$), the additive prediction of
the loss of test point $i$ after training on $S_m$ is

$$
\hat y_{m,i} = -\sum_{j \in S_m} I_{ij} ,
$$

(points that help lower the loss), and the LDS of test point $i$ is the Spearman
correlation over subsets between $\hat y_{\cdot,i}$ and $y_{\cdot,i}$. The LDS of the scores
is the mean over test points. Only ranks enter: the scale of the scores, a constant factor
such as $1/n$, does not matter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .checks import as_bool_matrix, as_finite_float
from .ranks import spearman_rows

__all__ = ["LdsResult", "lds", "subset_predictions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LdsResult:
    """The linear datamodeling score of a matrix of influence scores.

    Attributes:
        mean: the mean of `per_test` over the test points whose correlation is defined (0.0
            if there is none).
        per_test: shape `(n_test,)`, the Spearman correlation of each test point; 0.0 where
            it is undefined (see `defined`), never NaN.
        defined: shape `(n_test,)`, False for a test point whose measured outputs, or whose
            predictions, are the same on every subset (a constant has no ranks to
            correlate).
        n_undefined: the number of test points left out of `mean`.
    """

    mean: float
    per_test: NDArray[np.float64]
    defined: NDArray[np.bool_]
    n_undefined: int


def subset_predictions(scores: Any, subsets: Any) -> NDArray[np.float64]:
    r"""The additive predictions $\hat y_{m,i} = -\sum_{j \in S_m} I_{ij}$.

    Args:
        scores: influence scores, shape `(n_test, n_train)`, positive = helpful.
        subsets: boolean masks of the training points in each subset, shape
            `(M, n_train)`.

    Returns:
        Array of shape `(M, n_test)`.

    Raises:
        ValueError: as [lds][influx.evaluation.lds] for these two parameters.
    """
    values = as_finite_float(scores, "scores", 2)
    masks = as_bool_matrix(subsets, "subsets", (None, values.shape[1]))
    return -(masks.astype(np.float64) @ values.T)


def lds(scores: Any, subsets: Any, outputs: Any) -> LdsResult:
    r"""The linear datamodeling score of `scores` against retrained models.

    For each test point $i$, the Spearman correlation (ties by average rank) over the $M$
    subsets between the measured outputs $y_{m,i}$ and the predictions
    $\hat y_{m,i} = -\sum_{j\in S_m} I_{ij}$; the score is their mean over test points.
    A perfect additive predictor scores 1, its negation -1, a random one about 0.

    **Constant outputs.** A test point whose measured outputs (or whose predictions) are
    equal on every subset has no defined correlation: its entry of `per_test` is 0.0,
    `defined` is False for it, and it is excluded from `mean`, which averages over the
    defined points only (0.0 if none is defined; a warning is logged). `n_undefined` counts
    the excluded points, so no NaN is ever returned.

    Arrays are numpy arrays or anything `numpy.asarray` converts, such as torch tensors (of
    any library: only the numbers are used). Use
    [retrain_on_subsets][influx.evaluation.retrain_on_subsets] to produce `subsets` and
    `outputs`.

    Args:
        scores: influence scores, shape `(n_test, n_train)`, positive = the training point
            helps the test point (influx's convention; negate scores of libraries that report
            the change of the loss when up-weighting).
        subsets: boolean masks, shape `(M, n_train)`, True for the training points each
            retrained model saw; `M >= 2`.
        outputs: the measured test losses, shape `(M, n_test)`: `outputs[m, i]` is the loss
            on test point `i` of the model retrained on subset `m`.

    Returns:
        The [LdsResult][influx.evaluation.LdsResult]: mean and per-test-point correlations.

    Raises:
        ValueError: naming the parameter, for arrays of the wrong number of dimensions or
            shape (`subsets` must have `n_train` columns, `outputs` one row per subset and
            one column per test point), a `subsets` that is not boolean, fewer than 2
            subsets, a non-numeric dtype, NaN or Inf.
    """
    values = as_finite_float(scores, "scores", 2)
    n_test, n_train = values.shape
    masks = as_bool_matrix(subsets, "subsets", (None, n_train))
    n_subsets = masks.shape[0]
    if n_subsets < 2:
        raise ValueError(
            f"Parameter 'subsets' must hold at least 2 subsets (rows) to rank, got {n_subsets}."
        )
    measured = as_finite_float(outputs, "outputs", 2, (n_subsets, n_test))
    predicted = -(masks.astype(np.float64) @ values.T)
    per_test, defined = spearman_rows(measured.T, predicted.T)
    n_undefined = int(n_test - defined.sum())
    if n_undefined == n_test:
        logger.warning(
            "No test point has a defined Spearman correlation: outputs or predictions are "
            "constant over the subsets for all %d test points; the LDS is reported as 0.",
            n_test,
        )
        mean = 0.0
    else:
        if n_undefined:
            logger.info(
                "%d of %d test points have constant outputs or predictions over the subsets "
                "and are left out of the mean LDS.",
                n_undefined,
                n_test,
            )
        mean = float(per_test[defined].mean())
    return LdsResult(mean=mean, per_test=per_test, defined=defined, n_undefined=n_undefined)
