"""The tracker example on digits: the rankings made during training find the flipped labels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracker_digits(seed: int) -> None:
    import tracker_digits

    result = tracker_digits.main(epochs=4, n_train=400, seed=seed)
    assert result["accuracy"] >= 0.8  # the model learned despite the flipped labels
    assert result["EK-FAC, final model"] >= 0.95
    assert result["EK-FAC, checkpoint average"] >= 0.95
    assert result["TracIn-CP"] >= 0.75
