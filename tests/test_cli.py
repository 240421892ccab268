"""The demo: finds flipped labels and writes the influence matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from influx.cli import _auc, main


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # with ties
    labels = rng.random(40) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert _auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)


@pytest.mark.slow
def test_demo_finds_flipped_labels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    out = tmp_path / "influences.npy"
    png = tmp_path / "demo.png"
    assert main(["demo", "--no-progress", "--out", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000
    values = np.load(out)
    assert values.shape == (597, 1200)
    assert np.isfinite(values).all()
    text = caplog.text
    assert "Detection AUC" in text
    auc = float(text.split("Detection AUC (flipped vs clean, by harmfulness): ")[1].split()[0])
    assert auc > 0.85
