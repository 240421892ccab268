"""retrain_on_subsets: drawing, seeds, zarr store and resume, LocalCluster, bad input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from evaluation_ridge import RidgeProblem, TorchRegression

from influx.evaluation import draw_subsets, lds, retrain_on_subsets


def _run(problem: RidgeProblem, **kwargs: Any):
    arguments = {"n_subsets": 12, "fraction": 0.5, "seeds": (0, 1), "progress": False}
    arguments.update(kwargs)
    return retrain_on_subsets(problem.train, problem.measure, problem.n_train, **arguments)


def test_outputs_are_the_retrained_losses_averaged_over_seeds() -> None:
    problem = RidgeProblem(noise=0.05)
    result = _run(problem)
    assert result.subsets.shape == (12, 40) and result.subsets.dtype == bool
    assert (result.subsets.sum(axis=1) == 20).all()
    assert result.seeds == (0, 1)
    assert result.per_seed_outputs.shape == (2, 12, 6)
    for m in (0, 7):
        indices = np.flatnonzero(result.subsets[m])
        for s, seed in enumerate((0, 1)):
            expected = problem.measure(problem.train(indices, seed))
            np.testing.assert_array_equal(result.per_seed_outputs[s, m], expected)
    np.testing.assert_array_equal(result.outputs, result.per_seed_outputs.mean(axis=0))
    assert not np.array_equal(result.per_seed_outputs[0], result.per_seed_outputs[1])


def test_subsets_are_seeded_by_subset_seed() -> None:
    first = draw_subsets(30, 5, 0.3, subset_seed=4)
    np.testing.assert_array_equal(first, draw_subsets(30, 5, 0.3, subset_seed=4))
    assert not np.array_equal(first, draw_subsets(30, 5, 0.3, subset_seed=5))
    assert (first.sum(axis=1) == 9).all()
    assert len({row.tobytes() for row in first}) == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_influence_predicts_retraining_on_ridge_regression(seed: int) -> None:
    # test points far from a zero residual: their squared loss is close to linear in the
    # parameters over the range the subsets move them, where a first-order prediction holds
    problem = RidgeProblem(n=60, alpha=1.0, seed=seed, test_offset=2.0)
    result = _run(problem, n_subsets=40, seeds=(0,))
    score = result.lds(problem.influence())
    assert score.n_undefined == 0
    assert score.mean > 0.9 and (score.per_test > 0.85).all(), score.per_test
    assert result.lds(-problem.influence()).mean == pytest.approx(-score.mean, abs=1e-14)
    assert lds(np.zeros((6, 60)), result.subsets, result.outputs).mean == 0.0


class FailingOnThirdCall:
    """A train_fn that raises on its third call, as an interrupted run would stop."""

    def __init__(self, problem: RidgeProblem):
        self.problem, self.calls = problem, 0

    def __call__(self, indices: np.ndarray, seed: int) -> Any:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("interrupted")
        return self.problem.train(indices, seed)


class Counting:
    def __init__(self, problem: RidgeProblem):
        self.problem, self.calls = problem, 0

    def __call__(self, indices: np.ndarray, seed: int) -> Any:
        self.calls += 1
        return self.problem.train(indices, seed)


def test_resumes_after_an_interruption_with_identical_results(tmp_path: Path) -> None:
    problem = RidgeProblem(noise=0.05)
    reference = _run(problem)
    store = tmp_path / "truth.zarr"
    failing = FailingOnThirdCall(problem)
    with pytest.raises(RuntimeError, match="interrupted"):
        retrain_on_subsets(
            failing, problem.measure, 40, n_subsets=12, seeds=(0, 1), store=store, progress=False
        )
    done = zarr.open_group(store, mode="r")["done"][...]
    assert done.sum() == 2
    counting = Counting(problem)
    resumed = retrain_on_subsets(
        counting, problem.measure, 40, n_subsets=12, seeds=(0, 1), store=store, progress=False
    )
    assert counting.calls == 24 - 2
    np.testing.assert_array_equal(resumed.subsets, reference.subsets)
    np.testing.assert_array_equal(resumed.per_seed_outputs, reference.per_seed_outputs)
    np.testing.assert_array_equal(resumed.outputs, reference.outputs)
    again = Counting(problem)
    complete = retrain_on_subsets(
        again, problem.measure, 40, n_subsets=12, seeds=(0, 1), store=str(store), progress=False
    )
    assert again.calls == 0
    np.testing.assert_array_equal(complete.outputs, reference.outputs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_subsets": 13}, "holds retrainings made with n_subsets=12, this call has n_subsets=13"),
        (
            {"fraction": 0.25},
            "holds retrainings made with fraction=0.5, this call has fraction=0.25",
        ),
        ({"seeds": (0, 2)}, "holds retrainings made with seeds=[0, 1], this call has seeds=[0, 2]"),
        (
            {"subset_seed": 3},
            "holds retrainings made with subset_seed=0, this call has subset_seed=3",
        ),
    ],
)
def test_a_store_made_with_other_settings_is_refused(
    tmp_path: Path, change: dict, message: str
) -> None:
    problem = RidgeProblem()
    _run(problem, store=tmp_path / "truth.zarr")
    with pytest.raises(ValueError, match="Parameter 'store': .*" + re.escape(message)):
        _run(problem, store=tmp_path / "truth.zarr", **change)


def test_a_foreign_zarr_group_is_refused(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "other.zarr", mode="w")
    group.create_array("x", shape=(2,), dtype=float)
    with pytest.raises(ValueError, match="holds a zarr group that influx's evaluation did not"):
        _run(RidgeProblem(), store=tmp_path / "other.zarr")


def test_a_zarr_array_is_refused(tmp_path: Path) -> None:
    zarr.open_array(tmp_path / "array.zarr", mode="w", shape=(3,), dtype=float)
    with pytest.raises(ValueError, match="Parameter 'store': .* holds a zarr array, expected"):
        _run(RidgeProblem(), store=tmp_path / "array.zarr")


def test_on_a_local_cluster_results_equal_in_process(dask_client: Any, tmp_path: Path) -> None:
    problem = RidgeProblem(noise=0.05)
    reference = _run(problem)
    distributed = _run(problem, client=dask_client)
    np.testing.assert_array_equal(distributed.per_seed_outputs, reference.per_seed_outputs)
    stored = _run(problem, client=dask_client, store=tmp_path / "truth.zarr")
    np.testing.assert_array_equal(stored.per_seed_outputs, reference.per_seed_outputs)


def test_a_torch_model_gives_the_same_results_on_a_cluster_and_resumed(
    dask_client: Any, tmp_path: Path
) -> None:
    torch_problem = TorchRegression(RidgeProblem(n=30))
    arguments = {"n_subsets": 6, "seeds": (0, 1), "progress": False}
    reference = retrain_on_subsets(torch_problem.train, torch_problem.measure, 30, **arguments)
    assert reference.per_seed_outputs.dtype == np.float64
    assert not np.array_equal(reference.per_seed_outputs[0], reference.per_seed_outputs[1])
    there = retrain_on_subsets(
        torch_problem.train, torch_problem.measure, 30, client=dask_client, **arguments
    )
    np.testing.assert_array_equal(there.per_seed_outputs, reference.per_seed_outputs)
    with pytest.raises(RuntimeError, match="interrupted"):
        retrain_on_subsets(
            FailingOnThirdCall(torch_problem),  # type: ignore[arg-type]
            torch_problem.measure,
            30,
            store=tmp_path / "t.zarr",
            **arguments,
        )
    resumed = retrain_on_subsets(
        torch_problem.train,
        torch_problem.measure,
        30,
        client=dask_client,
        store=tmp_path / "t.zarr",
        **arguments,
    )
    np.testing.assert_array_equal(resumed.per_seed_outputs, reference.per_seed_outputs)


def test_a_failing_task_on_the_cluster_raises_its_error(dask_client: Any) -> None:
    problem = RidgeProblem()

    def broken(indices: np.ndarray, seed: int) -> Any:
        raise ArithmeticError("no model")

    with pytest.raises(ArithmeticError, match="no model"):
        retrain_on_subsets(
            broken, problem.measure, 40, n_subsets=3, client=dask_client, progress=False
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_train": 1}, "Parameter 'n_train' must be an integer >= 2, got 1."),
        ({"n_subsets": 1}, "Parameter 'n_subsets' must be an integer >= 2, got 1."),
        (
            {"fraction": 1.0},
            "Parameter 'fraction' must be a number strictly between 0 and 1, got 1.0.",
        ),
        ({"fraction": "half"}, "Parameter 'fraction' must be a number strictly between 0 and 1"),
        (
            {"fraction": 0.01},
            "Parameter 'fraction' must leave between 1 and n_train - 1 = 39 points in a subset, "
            "got fraction=0.01: 0 of 40 points.",
        ),
        ({"seeds": ()}, "Parameter 'seeds' must be a non-empty sequence of distinct integers"),
        ({"seeds": (1, 1)}, "Parameter 'seeds' must be a non-empty sequence of distinct integers"),
        ({"seeds": 3}, "Parameter 'seeds' must be a sequence of integers, e.g. (0, 1, 2), got 3."),
        ({"subset_seed": 0.5}, "Parameter 'subset_seed' must be an integer, got 0.5."),
    ],
)
def test_bad_settings_name_the_parameter(kwargs: dict, message: str) -> None:
    problem = RidgeProblem()
    arguments = {"n_train": 40, "n_subsets": 4, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        retrain_on_subsets(problem.train, problem.measure, **arguments)


@pytest.mark.parametrize(
    "measure, message",
    [
        (
            lambda theta: np.zeros((2, 3)),
            "must return one real loss per test point (shape "
            "(n_test,)), returned shape (2, 3) and dtype float64 for subset 0 with seed 0.",
        ),
        (
            lambda theta: np.full(6, np.nan),
            "Parameter 'measure_fn' returned NaN or Inf for subset 0 with seed 0",
        ),
        (
            lambda theta: np.zeros(6 if theta[0] > 0.3 else 5),
            "Parameter 'measure_fn' must "
            "return the same number of test losses for every retraining",
        ),
    ],
)
def test_bad_measurements_name_measure_fn(measure: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        retrain_on_subsets(
            lambda i, s: np.array([0.1 * s + len(i) / 100.0 + (i[0] % 2)]),
            measure,
            40,
            n_subsets=20,
            seeds=(0,),
            progress=False,
        )


def test_train_fn_must_be_callable() -> None:
    with pytest.raises(
        TypeError, match=re.escape("Parameter 'train_fn' must be a callable, got a str.")
    ):
        retrain_on_subsets("train", print, 10, progress=False)
