r"""Retraining without chosen points: leave-one-out and counterfactual removal.

* [leave_one_out][influx.evaluation.leave_one_out] retrains without each training point in
  turn: the effect of removing point $j$ on the loss of test point $i$,
  $\ell_i(\theta_{-j}) - \ell_i(\theta)$, is what an influence score predicts up to the
  factor $1/n$ (positive: the point helped).
* [counterfactual_removal][influx.evaluation.counterfactual_removal] removes, for each test
  point, the $k$ training points its scores call most helpful, then the $k$ most harmful,
  then $k$ random ones, and retrains each time: scores that mean something raise the test
  loss more than random removal in the first case and lower it in the second.

Both run on [run_retrainings][influx.evaluation.run_retrainings]: Dask client,
zarr store and resume work as for [retrain_on_subsets][influx.evaluation.retrain_on_subsets].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from numpy.typing import NDArray

from .checks import as_array, as_finite_float, check_positive_int, check_seeds
from .retraining import MeasureFunction, TrainFunction, run_retrainings

__all__ = [
    "CounterfactualResult",
    "LeaveOneOutResult",
    "counterfactual_removal",
    "leave_one_out",
]


@dataclass(frozen=True)
class LeaveOneOutResult:
    """Test losses of the model retrained without each chosen training point.

    Attributes:
        indices: `(k,)`, the training points removed, one per retraining.
        full_outputs: `(n_test,)`, the test losses of the model trained on all points.
        outputs: `(k, n_test)`, the test losses without `indices[r]` (row `r`).
        effects: `(n_test, k)`, `outputs.T - full_outputs[:, None]`: how much removing each
            point raised each test loss. Positive means the point helped, as an influence
            score does; `effects` is comparable to `scores[:, indices] / n_train`.
    """

    indices: NDArray[np.int64]
    full_outputs: NDArray[np.float64]
    outputs: NDArray[np.float64]
    effects: NDArray[np.float64]


@dataclass(frozen=True)
class CounterfactualResult:
    """Test-loss changes after removing chosen training points and retraining.

    Each entry is the loss of one test point after retraining without $k$ training points
    minus its loss with all of them. Scores that predict retraining give
    `helpful_removed > random_removed > harmful_removed` on most test points.

    Attributes:
        test_indices: `(n,)`, the test points.
        k: the number of training points removed in each retraining.
        full_outputs: `(n,)`, the loss of each test point with all training points.
        helpful_removed: `(n,)`, the change after removing its `k` highest-scored points.
        harmful_removed: `(n,)`, the change after removing its `k` lowest-scored points.
        random_removed: `(n,)`, the change after removing `k` random points.
    """

    test_indices: NDArray[np.int64]
    k: int
    full_outputs: NDArray[np.float64]
    helpful_removed: NDArray[np.float64]
    harmful_removed: NDArray[np.float64]
    random_removed: NDArray[np.float64]


def _check_indices(value: Any, name: str, bound: int, bound_name: str) -> NDArray[np.int64]:
    array = as_array(value, name)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"Parameter '{name}' must be a non-empty 1-d array of integers, got shape "
            f"{array.shape} and dtype {array.dtype}."
        )
    if array.min() < 0 or array.max() >= bound:
        raise ValueError(
            f"Parameter '{name}' must hold indices in [0, {bound_name}) = [0, {bound}), got "
            f"values from {int(array.min())} to {int(array.max())}."
        )
    if len(np.unique(array)) != len(array):
        raise ValueError(f"Parameter '{name}' must not repeat an index, got {array.tolist()}.")
    return array.astype(np.int64)


def leave_one_out(
    train_fn: TrainFunction,
    measure_fn: MeasureFunction,
    n_train: int,
    indices: Any = None,
    seeds: Sequence[int] = (0,),
    store: Any = None,
    client: Any = None,
    progress: bool = True,
) -> LeaveOneOutResult:
    r"""Retrain without each training point of `indices` in turn and measure the test losses.

    One retraining on all $n$ points, then one without each point $j$ of `indices`; with
    several seeds, the losses are averaged over them. The result's `effects`,
    $\ell_i(\theta_{-j}) - \ell_i(\theta)$, are the exact counterpart of the first-order
    prediction $I(z_i, z_j)/n$ of an influence score.

    Args:
        train_fn: `train_fn(indices, seed) -> model`, as for
            [retrain_on_subsets][influx.evaluation.retrain_on_subsets].
        measure_fn: `measure_fn(model) -> (n_test,)` test losses.
        n_train: the number of training points.
        indices: the training points to leave out (distinct, in `[0, n_train)`); None for
            all.
        seeds: the training seeds (the losses are their mean).
        store: a path or zarr store to write to and resume from; None keeps results in
            memory. Its settings (`n_train`, `indices`, `seeds`) are checked on resume.
        client: a `distributed.Client` to run one task per retraining on; None runs here.
        progress: show a progress bar.

    Returns:
        The [LeaveOneOutResult][influx.evaluation.LeaveOneOutResult].

    Raises:
        ValueError: naming the parameter, for an `n_train` below 2, `indices` that are not
            distinct integers in range, bad `seeds`, or a store made with other settings.
    """
    n_train = check_positive_int(n_train, "n_train", 2)
    seeds = check_seeds(seeds)
    chosen = (
        np.arange(n_train, dtype=np.int64)
        if indices is None
        else _check_indices(indices, "indices", n_train, "n_train")
    )
    subsets = np.ones((len(chosen) + 1, n_train), dtype=bool)
    subsets[np.arange(1, len(chosen) + 1), chosen] = False
    settings = {
        "kind": "leave_one_out",
        "n_train": n_train,
        "indices": chosen.tolist(),
        "seeds": list(seeds),
    }
    per_seed = run_retrainings(
        train_fn, measure_fn, subsets, seeds, store, settings, client, progress, "leave-one-out"
    )
    outputs = per_seed.mean(axis=0)
    full, removed = outputs[0], outputs[1:]
    return LeaveOneOutResult(
        indices=chosen, full_outputs=full, outputs=removed, effects=removed.T - full[:, None]
    )


def counterfactual_removal(
    scores: Any,
    k: int,
    train_fn: TrainFunction,
    measure_fn: MeasureFunction,
    test_indices: Any = None,
    seed: int = 0,
    *,
    store: Any = None,
    client: Any = None,
    progress: bool = True,
) -> CounterfactualResult:
    r"""Remove each test point's top-$k$ helpful, top-$k$ harmful and $k$ random training
    points, retrain, and report the change of its loss.

    For each test point $i$ of `test_indices`, three retrainings: without the $k$ training
    points of largest `scores[i]` (most helpful; ties by lower index), without the $k$ of
    smallest `scores[i]` (most harmful), and without $k$ points drawn at random; plus one
    retraining on all points. Each reports $\ell_i(\theta_{-R}) - \ell_i(\theta)$ for its
    removed set $R$. Removing helpful points should raise the loss more than removing
    random ones; removing harmful ones should lower it.

    Args:
        scores: influence scores `(n_test, n_train)`, positive = helpful.
        k: the number of training points removed, `1 <= k < n_train`.
        train_fn: `train_fn(indices, seed) -> model`.
        measure_fn: `measure_fn(model) -> (n_test,)` test losses, in the order of the rows
            of `scores`.
        test_indices: the test points (rows of `scores`) to evaluate; None for all.
        seed: the seed of every retraining and of the numpy Generator
            `np.random.default_rng(seed)` that draws the random sets, one per test point in
            the order of `test_indices`.
        store: a path or zarr store to write to and resume from; None keeps results in
            memory.
        client: a `distributed.Client` to run one task per retraining on; None runs here.
        progress: show a progress bar.

    Returns:
        The [CounterfactualResult][influx.evaluation.CounterfactualResult].

    Raises:
        ValueError: naming the parameter, for `scores` that are not a finite 2-d array, a
            `k` out of range, `test_indices` that are not distinct rows of `scores`, or a
            store made with other settings.
    """
    values = as_finite_float(scores, "scores", 2)
    n_test, n_train = values.shape
    if n_train < 2:
        raise ValueError(
            f"Parameter 'scores' must have at least 2 training points (columns), got shape "
            f"{values.shape}."
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n_train:
        raise ValueError(
            f"Parameter 'k' must be an integer with 1 <= k < n_train = {n_train}, got {k!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"Parameter 'seed' must be an integer, got {seed!r}.")
    chosen = (
        np.arange(n_test, dtype=np.int64)
        if test_indices is None
        else _check_indices(test_indices, "test_indices", n_test, "n_test")
    )
    rng = np.random.default_rng(int(seed))
    subsets = np.ones((3 * len(chosen) + 1, n_train), dtype=bool)
    for position, i in enumerate(chosen):
        order = np.argsort(-values[i], kind="stable")
        helpful = order[:k]
        harmful = np.argsort(values[i], kind="stable")[:k]
        subsets[1 + 3 * position, helpful] = False
        subsets[2 + 3 * position, harmful] = False
        subsets[3 + 3 * position, rng.choice(n_train, size=int(k), replace=False)] = False
    settings = {
        "kind": "counterfactual_removal",
        "n_train": n_train,
        "n_test": n_test,
        "k": int(k),
        "test_indices": chosen.tolist(),
        "seed": int(seed),
    }
    outputs = run_retrainings(
        train_fn,
        measure_fn,
        subsets,
        (int(seed),),
        store,
        settings,
        client,
        progress,
        "counterfactual removal",
    )[0]
    if outputs.shape[1] != n_test:
        raise ValueError(
            f"Parameter 'measure_fn' must return one loss per row of 'scores' ({n_test}), "
            f"returned {outputs.shape[1]}."
        )
    positions = np.arange(len(chosen))
    full = outputs[0, chosen]
    return CounterfactualResult(
        test_indices=chosen,
        k=int(k),
        full_outputs=full,
        helpful_removed=outputs[1 + 3 * positions, chosen] - full,
        harmful_removed=outputs[2 + 3 * positions, chosen] - full,
        random_removed=outputs[3 + 3 * positions, chosen] - full,
    )
