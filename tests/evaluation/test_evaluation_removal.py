"""leave_one_out and counterfactual_removal against closed forms of ridge regression."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from evaluation_ridge import RidgeProblem

import torch
from influx.evaluation import counterfactual_removal, leave_one_out


def test_leave_one_out_matches_sherman_morrison() -> None:
    problem = RidgeProblem(n=25)
    result = leave_one_out(problem.train, problem.measure, 25, progress=False)
    np.testing.assert_array_equal(result.indices, np.arange(25))
    full = problem.measure(problem.train(np.arange(25), 0))
    np.testing.assert_allclose(result.full_outputs, full, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.effects, problem.exact_leave_one_out(), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(result.outputs.T - result.full_outputs[:, None], result.effects)


def test_exact_influence_of_influx_predicts_leave_one_out(tmp_path: Path) -> None:
    """DirectInfluence on the ridge model: with theta_{-j} - theta = A^{-1} x_j r_j/(1 - h_j),
    the exact effect of a removal is I_ij / (n (1 - h_j)) + (x_i^T A^{-1} x_j r_j/(1-h_j))^2."""
    from influx.torch import DirectInfluence

    problem = RidgeProblem(n=25, alpha=2.0)
    n = problem.n_train
    theta = problem.train(np.arange(n), 0)
    net = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(theta)[None, :])
    x, y = torch.tensor(problem.x), torch.tensor(problem.y)[:, None]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    # the objective (1/n) sum of squared errors + (alpha/n) |theta|^2 has Hessian 2A/n
    model = DirectInfluence(net, torch.nn.functional.mse_loss, regularization=2.0 * 2.0 / n)
    model.fit(loader)
    scores = model.influences(
        torch.tensor(problem.x_test), torch.tensor(problem.y_test)[:, None], x, y
    ).numpy()
    np.testing.assert_allclose(scores, n * problem.influence(), rtol=1e-10)
    result = leave_one_out(
        problem.train, problem.measure, n, store=tmp_path / "loo.zarr", progress=False
    )
    a = problem.x.T @ problem.x + problem.alpha * np.eye(3)
    residual = problem.x @ theta - problem.y
    shift = problem.x_test @ np.linalg.solve(a, problem.x.T) * residual / (1 - problem.leverage())
    predicted = scores / (n * (1.0 - problem.leverage())) + shift**2
    np.testing.assert_allclose(result.effects, predicted, rtol=1e-9, atol=1e-12)


def test_leave_one_out_of_chosen_points_with_seeds_resumes_from_its_store(tmp_path: Path) -> None:
    problem = RidgeProblem(n=20, noise=0.01)
    arguments = {"indices": [3, 0, 11], "seeds": (0, 1), "progress": False}
    first = leave_one_out(
        problem.train, problem.measure, 20, store=tmp_path / "l.zarr", **arguments
    )
    assert first.outputs.shape == (3, 6) and first.effects.shape == (6, 3)
    without_3 = np.delete(np.arange(20), 3)
    expected = np.mean([problem.measure(problem.train(without_3, s)) for s in (0, 1)], axis=0)
    np.testing.assert_allclose(first.outputs[0], expected, rtol=1e-14)

    def never(indices: Any, seed: int) -> Any:
        raise AssertionError("retrained although the store is complete")

    again = leave_one_out(never, problem.measure, 20, store=tmp_path / "l.zarr", **arguments)
    np.testing.assert_array_equal(again.effects, first.effects)
    with pytest.raises(
        ValueError, match=re.escape("indices=[3, 0, 11], this call has indices=[3, 0]")
    ):
        leave_one_out(
            never, problem.measure, 20, indices=[3, 0], seeds=(0, 1), store=tmp_path / "l.zarr"
        )


@pytest.mark.parametrize(
    "indices, message",
    [
        ([], "Parameter 'indices' must be a non-empty 1-d array of integers, got shape (0,)"),
        (
            [0.5],
            "Parameter 'indices' must be a non-empty 1-d array of integers, got shape (1,) "
            "and dtype float64.",
        ),
        (
            [0, 20],
            "Parameter 'indices' must hold indices in [0, n_train) = [0, 20), got values "
            "from 0 to 20.",
        ),
        ([1, 1], "Parameter 'indices' must not repeat an index, got [1, 1]."),
    ],
)
def test_leave_one_out_bad_indices(indices: Any, message: str) -> None:
    problem = RidgeProblem(n=20)
    with pytest.raises(ValueError, match=re.escape(message)):
        leave_one_out(problem.train, problem.measure, 20, indices=np.array(indices))


def test_counterfactual_removal_of_helpful_and_harmful_points() -> None:
    problem = RidgeProblem(n=40, test_offset=2.0)
    scores = problem.influence()
    result = counterfactual_removal(
        scores, 5, problem.train, problem.measure, test_indices=[0, 2, 5], progress=False
    )
    np.testing.assert_array_equal(result.test_indices, [0, 2, 5])
    assert result.k == 5
    full = problem.measure(problem.train(np.arange(40), 0))
    np.testing.assert_allclose(result.full_outputs, full[[0, 2, 5]], rtol=1e-14)
    for position, i in enumerate([0, 2, 5]):
        kept = np.sort(np.argsort(-scores[i], kind="stable")[5:])
        after = problem.measure(problem.train(kept, 0))[i]
        assert result.helpful_removed[position] == pytest.approx(after - full[i], rel=1e-12)
    assert (result.helpful_removed > result.random_removed).all()
    assert (result.harmful_removed < result.random_removed).all()
    assert (result.helpful_removed > 0).all() and (result.harmful_removed < 0).all()


def test_counterfactual_removal_is_the_same_on_a_cluster(dask_client: Any) -> None:
    problem = RidgeProblem(n=30)
    scores = problem.influence()
    here = counterfactual_removal(scores, 3, problem.train, problem.measure, seed=4, progress=False)
    there = counterfactual_removal(
        scores, 3, problem.train, problem.measure, seed=4, client=dask_client, progress=False
    )
    for name in ("full_outputs", "helpful_removed", "harmful_removed", "random_removed"):
        np.testing.assert_array_equal(getattr(here, name), getattr(there, name))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": 0}, "Parameter 'k' must be an integer with 1 <= k < n_train = 30, got 0."),
        ({"k": 30}, "Parameter 'k' must be an integer with 1 <= k < n_train = 30, got 30."),
        (
            {"scores": np.zeros((6, 1))},
            "Parameter 'scores' must have at least 2 training points (columns), got shape (6, 1).",
        ),
        ({"scores": np.zeros(30)}, "Parameter 'scores' must have 2 dimension(s), got shape (30,)."),
        (
            {"test_indices": [6]},
            "Parameter 'test_indices' must hold indices in [0, n_test) = "
            "[0, 6), got values from 6 to 6.",
        ),
        ({"seed": None}, "Parameter 'seed' must be an integer, got None."),
    ],
)
def test_counterfactual_removal_bad_input(change: dict, message: str) -> None:
    problem = RidgeProblem(n=30)
    arguments = {"scores": problem.influence(), "k": 3, **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        counterfactual_removal(train_fn=problem.train, measure_fn=problem.measure, **arguments)


def test_counterfactual_removal_checks_the_number_of_test_losses() -> None:
    problem = RidgeProblem(n=30)
    with pytest.raises(ValueError, match=re.escape("must return one loss per row of 'scores' (4)")):
        counterfactual_removal(np.zeros((4, 30)), 2, problem.train, problem.measure, progress=False)
