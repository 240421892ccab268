"""lds, ranks and detection_auc: closed forms, scipy agreement, constant outputs, bad input."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

import torch
from influx.evaluation import average_ranks, detection_auc, lds, subset_predictions


def _problem(seed: int = 0, n_test: int = 5, n_train: int = 12, n_subsets: int = 30):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_test, n_train))
    subsets = rng.random((n_subsets, n_train)) < 0.5
    return scores, subsets


def test_perfect_predictor_scores_one_and_its_negation_minus_one() -> None:
    scores, subsets = _problem()
    outputs = -subsets.astype(float) @ scores.T
    result = lds(scores, subsets, outputs)
    np.testing.assert_allclose(result.per_test, 1.0, rtol=0, atol=1e-14)
    assert result.mean == pytest.approx(1.0, abs=1e-14)
    assert result.n_undefined == 0 and result.defined.all()
    assert lds(-scores, subsets, outputs).mean == pytest.approx(-1.0, abs=1e-14)
    # only ranks count: a monotone transform of the outputs and a scale of the scores
    assert lds(5.0 * scores, subsets, np.exp(outputs)).mean == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_array_equal(subset_predictions(scores, subsets), outputs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scipy_spearmanr_with_ties(seed: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    scores, subsets = _problem(seed, n_test=8, n_train=10, n_subsets=40)
    scores = np.round(scores, 0)  # many tied predictions
    outputs = np.round(rng.normal(size=(40, 8)), 1)  # tied outputs
    result = lds(scores, subsets, outputs)
    predictions = -subsets.astype(float) @ scores.T
    expected = [stats.spearmanr(outputs[:, i], predictions[:, i]).statistic for i in range(8)]
    np.testing.assert_allclose(result.per_test, expected, rtol=0, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected), abs=1e-12)


def test_average_ranks_match_scipy_rankdata() -> None:
    stats = pytest.importorskip("scipy.stats")
    values = np.array([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    expected = stats.rankdata(values, axis=1)
    np.testing.assert_array_equal(average_ranks(values), expected)
    np.testing.assert_array_equal(average_ranks(values)[0], [5.0, 1.5, 5.0, 3.0, 1.5, 5.0])


def test_constant_outputs_or_predictions_are_left_out_of_the_mean(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scores, subsets = _problem()
    outputs = -subsets.astype(float) @ scores.T
    outputs[:, 1] = 0.7  # constant measured loss
    scores[3] = 0.0  # constant prediction
    result = lds(scores, subsets, outputs)
    assert not np.isnan(result.per_test).any()
    np.testing.assert_array_equal(result.defined, [True, False, True, False, True])
    assert result.n_undefined == 2
    assert result.per_test[1] == 0.0 and result.per_test[3] == 0.0
    assert result.mean == pytest.approx(1.0, abs=1e-14)  # the mean of the three defined
    with caplog.at_level(logging.WARNING, logger="influx.evaluation"):
        none = lds(np.zeros_like(scores), subsets, outputs)
    assert none.mean == 0.0 and none.n_undefined == 5
    assert "No test point has a defined Spearman correlation" in caplog.text


def test_accepts_tensors_that_require_grad() -> None:
    scores, subsets = _problem()
    outputs = -subsets.astype(float) @ scores.T
    tensor = torch.tensor(scores, requires_grad=True)
    result = lds(tensor, torch.tensor(subsets), torch.tensor(outputs, dtype=torch.float32))
    assert result.mean == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"scores": np.zeros(12)},
            "Parameter 'scores' must have 2 dimension(s), got shape (12,).",
        ),
        (
            {"scores": np.full((5, 12), "a")},
            "Parameter 'scores' must hold real numbers (a float or integer dtype), got dtype <U1.",
        ),
        (
            {"scores": np.where(np.eye(5, 12) > 0, np.nan, 0.0)},
            "Parameter 'scores' must be finite, got 5 NaN or Inf value(s), the first at index "
            "(0, 0).",
        ),
        (
            {"subsets": np.ones((30, 12))},
            "Parameter 'subsets' must be a boolean mask (dtype bool), got dtype float64.",
        ),
        (
            {"subsets": np.ones((30, 11), dtype=bool)},
            "Parameter 'subsets' must have shape (*, 12), got (30, 11).",
        ),
        (
            {"subsets": np.ones((1, 12), dtype=bool)},
            "Parameter 'subsets' must hold at least 2 subsets (rows) to rank, got 1.",
        ),
        (
            {"outputs": np.zeros((30, 4))},
            "Parameter 'outputs' must have shape (30, 5), got (30, 4).",
        ),
        (
            {"outputs": np.zeros((29, 5))},
            "Parameter 'outputs' must have shape (30, 5), got (29, 5).",
        ),
        (
            {"outputs": np.full((30, 5), np.inf)},
            "Parameter 'outputs' must be finite, got 150 NaN or Inf value(s), the first at index "
            "(0, 0).",
        ),
        (
            {"outputs": object()},
            "Parameter 'outputs' must hold real numbers (a float or integer dtype), got dtype "
            "object.",
        ),
    ],
)
def test_bad_input_names_the_parameter(change: dict, message: str) -> None:
    scores, subsets = _problem()
    arguments = {"scores": scores, "subsets": subsets, "outputs": np.zeros((30, 5))}
    arguments.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        lds(**arguments)


def test_detection_auc_is_the_pairwise_probability() -> None:
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=50), 1)  # with ties
    flagged = rng.random(50) < 0.3
    pairs = values[flagged][:, None] - values[~flagged][None, :]
    pairwise = ((pairs > 0) + 0.5 * (pairs == 0)).mean()
    assert detection_auc(values, flagged) == pytest.approx(pairwise, abs=1e-12)
    assert detection_auc(flagged.astype(float), flagged) == 1.0
    assert detection_auc(torch.tensor(values), torch.tensor(flagged)) == pytest.approx(pairwise)


def test_detection_auc_stays_importable_from_the_cli() -> None:
    from influx.cli import detection_auc as cli_detection_auc

    assert cli_detection_auc is detection_auc


@pytest.mark.parametrize(
    "values, flagged, message",
    [
        (np.zeros((2, 2)), np.zeros(4, bool), "Parameter 'values' must have 1 dimension(s)"),
        (
            np.zeros(4),
            np.zeros(4),
            "Parameter 'flagged' must be a boolean mask (dtype bool), got dtype float64.",
        ),
        (
            np.zeros(4),
            np.zeros(3, bool),
            "Parameter 'flagged' must have the shape of 'values' (4,), got (3,).",
        ),
        (
            np.zeros(4),
            np.zeros(4, bool),
            "Parameter 'flagged' must mark at least one point and "
            "leave at least one unmarked, got 0 flagged of 4.",
        ),
        (np.array([0.0, np.nan]), np.array([True, False]), "Parameter 'values' must be finite"),
    ],
)
def test_detection_auc_bad_input(values: np.ndarray, flagged: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        detection_auc(values, flagged)
