r"""Retraining on subsets of the training data: the ground truth of the LDS.

[retrain_on_subsets][influx.evaluation.retrain_on_subsets] draws $M$ random subsets of the
training data, retrains the user's model on each with one or several seeds, measures its
loss on every test point and averages over the seeds. Retraining is the expensive part:
it runs one task per retraining on a Dask client when given, and writes each result to a
zarr store as soon as it completes (see [influx.evaluation.store][influx.evaluation.store]),
so that an interrupted run resumes where it stopped with identical results.

The user supplies two functions, which must be deterministic given their arguments for
results to be reproducible (and picklable, with what they reference, to run on Dask). A Dask
worker does not share the caller's process-wide settings: set what a result depends on
inside `train_fn` (the seed, and the dtype of new parameters rather than torch's default
dtype). The tasks of a worker with several threads run concurrently in one process, where
they would race for torch's global random generator: draw from a generator of the task's
own (`torch.Generator().manual_seed(seed)`), or run workers with one thread each.

* `train_fn(indices, seed) -> model`: train a model from scratch on the training points
  `indices` (a sorted int64 numpy array) with the random seed `seed`;
* `measure_fn(model) -> losses`: the loss of `model` on each test point, shape `(n_test,)`
  (a numpy array, a tensor or a list).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray
from tqdm.auto import tqdm

from .checks import as_array, check_positive_int, check_seeds
from .datamodeling import LdsResult, lds
from .store import RetrainingStore

__all__ = [
    "MeasureFunction",
    "RetrainingResult",
    "TrainFunction",
    "draw_subsets",
    "retrain_on_subsets",
    "run_retrainings",
]

logger = logging.getLogger(__name__)

TrainFunction = Callable[[NDArray[np.int64], int], Any]
"""`train_fn(indices, seed) -> model`: a model trained on the training points `indices`."""
MeasureFunction = Callable[[Any], Any]
"""`measure_fn(model) -> losses`: the loss of `model` on each test point, shape `(n_test,)`."""


@dataclass(frozen=True)
class RetrainingResult:
    """The measured test losses of models retrained on subsets of the training data.

    Attributes:
        subsets: boolean masks `(M, n_train)`: the training points of each subset.
        outputs: `(M, n_test)`, the test losses averaged over the seeds.
        per_seed_outputs: `(n_seeds, M, n_test)`, the test losses of each seed.
        seeds: the training seeds, in the order of `per_seed_outputs`.
    """

    subsets: NDArray[np.bool_]
    outputs: NDArray[np.float64]
    per_seed_outputs: NDArray[np.float64]
    seeds: Tuple[int, ...]

    def lds(self, scores: Any) -> LdsResult:
        """The [lds][influx.evaluation.lds] of `scores` `(n_test, n_train)` on these
        retrainings."""
        return lds(scores, self.subsets, self.outputs)


def check_fraction(fraction: Any, n_train: int) -> int:
    """The subset size `round(fraction * n_train)`, else a ValueError naming `fraction`."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float, np.floating))
        or not 0 < fraction < 1
    ):
        raise ValueError(
            f"Parameter 'fraction' must be a number strictly between 0 and 1, got {fraction!r}."
        )
    size = int(round(float(fraction) * n_train))
    if not 1 <= size <= n_train - 1:
        raise ValueError(
            f"Parameter 'fraction' must leave between 1 and n_train - 1 = {n_train - 1} "
            f"points in a subset, got fraction={fraction!r}: {size} of {n_train} points."
        )
    return size


def draw_subsets(
    n_train: int, n_subsets: int, fraction: float, subset_seed: int = 0
) -> NDArray[np.bool_]:
    """Random subsets of `round(fraction * n_train)` training points each.

    Subset `m` is the `m`-th draw without replacement of a numpy Generator
    `np.random.default_rng(subset_seed)`: the same arguments give the same subsets.

    Returns:
        Boolean masks of shape `(n_subsets, n_train)`.

    Raises:
        ValueError: naming the parameter, for an `n_train` below 2, an `n_subsets` below 2 or
            a `fraction` that leaves no point in or out of a subset.
    """
    n_train = check_positive_int(n_train, "n_train", 2)
    n_subsets = check_positive_int(n_subsets, "n_subsets", 2)
    size = check_fraction(fraction, n_train)
    if isinstance(subset_seed, bool) or not isinstance(subset_seed, (int, np.integer)):
        raise ValueError(f"Parameter 'subset_seed' must be an integer, got {subset_seed!r}.")
    rng = np.random.default_rng(int(subset_seed))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def retrain_one(
    train_fn: TrainFunction, measure_fn: MeasureFunction, indices: NDArray[np.int64], seed: int
) -> Any:
    """Train on `indices` with `seed` and measure: one retraining (a Dask task)."""
    model = train_fn(indices, seed)
    values = measure_fn(model)
    return as_array(values, "measure_fn")


def _checked_outputs(
    values: Any, expected_n_test: Optional[int], subset_index: int, seed: int
) -> NDArray[np.float64]:
    array = as_array(values, "measure_fn")
    where = f"for subset {subset_index} with seed {seed}"
    if array.ndim != 1 or array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise ValueError(
            f"Parameter 'measure_fn' must return one real loss per test point (shape "
            f"(n_test,)), returned shape {array.shape} and dtype {array.dtype} {where}."
        )
    if expected_n_test is not None and array.shape[0] != expected_n_test:
        raise ValueError(
            f"Parameter 'measure_fn' must return the same number of test losses for every "
            f"retraining: {expected_n_test} before, {array.shape[0]} {where}."
        )
    result = array.astype(np.float64)
    if not np.isfinite(result).all():
        raise ValueError(
            f"Parameter 'measure_fn' returned NaN or Inf {where}: did the retraining diverge?"
        )
    return result


def _check_callables(train_fn: Any, measure_fn: Any) -> None:
    for name, value in (("train_fn", train_fn), ("measure_fn", measure_fn)):
        if not callable(value):
            raise TypeError(f"Parameter '{name}' must be a callable, got a {type(value).__name__}.")


def run_retrainings(
    train_fn: TrainFunction,
    measure_fn: MeasureFunction,
    subsets: NDArray[np.bool_],
    seeds: Sequence[int],
    store: Any = None,
    settings: Optional[Dict[str, Any]] = None,
    client: Any = None,
    progress: bool = True,
    description: str = "retraining",
) -> NDArray[np.float64]:
    """Retrain on every subset with every seed and measure: the engine of the evaluation
    functions.

    Args:
        train_fn: `train_fn(indices, seed) -> model`.
        measure_fn: `measure_fn(model) -> (n_test,)` test losses.
        subsets: boolean masks `(M, n_train)`.
        seeds: the training seeds.
        store: a zarr path or store to write to and resume from, or None.
        settings: what identifies the computation in the store (checked on resume).
        client: a `distributed.Client` to run one task per retraining on, or None.
        progress: show a progress bar.
        description: the label of the progress bar.

    Returns:
        The test losses `(n_seeds, M, n_test)`.
    """
    _check_callables(train_fn, measure_fn)
    n_seeds, n_subsets = len(seeds), subsets.shape[0]
    record = (
        None if store is None else RetrainingStore(store, dict(settings or {}), subsets, n_seeds)
    )
    done = np.zeros((n_seeds, n_subsets), dtype=bool) if record is None else record.done.copy()
    n_test = None if record is None else record.n_test
    results: Dict[Tuple[int, int], NDArray[np.float64]] = {}
    pending = [(s, m) for s in range(n_seeds) for m in range(n_subsets) if not done[s, m]]
    bar = tqdm(
        total=n_seeds * n_subsets, initial=int(done.sum()), desc=description, disable=not progress
    )

    def accept(s: int, m: int, values: Any) -> None:
        nonlocal n_test
        checked = _checked_outputs(values, n_test, m, seeds[s])
        n_test = checked.shape[0]
        if record is not None:
            record.write(s, m, checked)
        results[(s, m)] = checked
        bar.update()

    try:
        if client is None:
            for s, m in pending:
                accept(
                    s, m, retrain_one(train_fn, measure_fn, np.flatnonzero(subsets[m]), seeds[s])
                )
        else:
            _run_on_client(client, train_fn, measure_fn, subsets, seeds, pending, accept)
    finally:
        bar.close()
    if record is not None:
        if n_test is None:  # nothing was run and nothing is stored: no subsets
            return np.zeros((n_seeds, n_subsets, 0))
        return record.outputs()
    assert n_test is not None
    outputs = np.empty((n_seeds, n_subsets, n_test), dtype=np.float64)
    for (s, m), values in results.items():
        outputs[s, m] = values
    return outputs


def _run_on_client(
    client: Any,
    train_fn: TrainFunction,
    measure_fn: MeasureFunction,
    subsets: NDArray[np.bool_],
    seeds: Sequence[int],
    pending: Sequence[Tuple[int, int]],
    accept: Callable[[int, int, Any], None],
) -> None:
    from distributed import as_completed

    if not pending:
        return
    # the functions (and the data they hold) travel to each worker once, not once per task
    functions = client.scatter([train_fn, measure_fn], broadcast=True, hash=False)
    futures = {
        client.submit(retrain_one, *functions, np.flatnonzero(subsets[m]), seeds[s], pure=False): (
            s,
            m,
        )
        for s, m in pending
    }
    try:
        for future in as_completed(list(futures)):
            s, m = futures[future]
            accept(s, m, future.result())
    finally:
        unfinished = [f for f in futures if not f.done()]
        if unfinished:
            client.cancel(unfinished)


def retrain_on_subsets(
    train_fn: TrainFunction,
    measure_fn: MeasureFunction,
    n_train: int,
    n_subsets: int = 100,
    fraction: float = 0.5,
    seeds: Sequence[int] = (0,),
    store: Any = None,
    client: Any = None,
    progress: bool = True,
    *,
    subset_seed: int = 0,
) -> RetrainingResult:
    r"""Retrain on random subsets of the training data and measure the test losses.

    Draws `n_subsets` subsets of `round(fraction * n_train)` training points with
    [draw_subsets][influx.evaluation.draw_subsets] (seeded by `subset_seed`),
    calls `train_fn(indices, seed)` and `measure_fn(model)` for every subset and every seed,
    and averages the test losses over the seeds:
    $y_{m,i} = \frac{1}{|\mathrm{seeds}|}\sum_s \ell_i(\theta_{S_m, s})$. Feed the result to
    [lds][influx.evaluation.lds] (or its `lds` method) with the scores of any method.

    **Dask.** With a `client`, each retraining is one task (`train_fn` and `measure_fn`
    are pickled to the workers); results are collected as they complete.

    **Store and resume.** With a `store` (a path or a zarr store), each result is written as
    soon as it arrives, with a completion flag per retraining; calling again with the same
    store and settings skips the retrainings already done (after an interruption, a crash,
    or to add nothing). The subsets and the settings (`n_train`, `n_subsets`, `fraction`,
    `seeds`, `subset_seed`) are stored and checked: a store made with other settings is a
    `ValueError` naming the setting. Results are identical in-process, resumed, and on a
    cluster when `train_fn` and `measure_fn` are deterministic.

    Args:
        train_fn: `train_fn(indices, seed) -> model`, trains from scratch on the training
            points `indices` (sorted int64 array) with the seed `seed`.
        measure_fn: `measure_fn(model) -> (n_test,)`, the loss of the model on each test
            point.
        n_train: the number of training points.
        n_subsets: the number of subsets $M \ge 2$.
        fraction: the fraction of the training points in each subset, in (0, 1).
        seeds: the training seeds of each subset (distinct integers); the outputs are their
            mean.
        store: a path or zarr store to write to and resume from; None keeps results in
            memory only.
        client: a `distributed.Client`; None runs in this process.
        progress: show a progress bar over the retrainings.
        subset_seed: the seed of the numpy Generator that draws the subsets.

    Returns:
        The [RetrainingResult][influx.evaluation.RetrainingResult].

    Raises:
        ValueError: naming the parameter, for an `n_train` or `n_subsets` below 2, a
            `fraction` outside (0, 1) or leaving no point in or out, empty or repeated
            `seeds`, a store made with other settings, or a `measure_fn` that returns
            something else than `(n_test,)` finite losses.
        TypeError: if `train_fn` or `measure_fn` is not callable.
    """
    seeds = check_seeds(seeds)
    subsets = draw_subsets(n_train, n_subsets, fraction, subset_seed)
    settings = {
        "kind": "subsets",
        "n_train": int(n_train),
        "n_subsets": int(n_subsets),
        "fraction": float(fraction),
        "seeds": list(seeds),
        "subset_seed": int(subset_seed),
    }
    per_seed = run_retrainings(
        train_fn, measure_fn, subsets, seeds, store, settings, client, progress, "retraining"
    )
    return RetrainingResult(
        subsets=subsets, outputs=per_seed.mean(axis=0), per_seed_outputs=per_seed, seeds=seeds
    )
