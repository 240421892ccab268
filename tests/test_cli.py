"""The demo: finds flipped labels and writes the influence matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from influx.cli import detection_auc, main


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # with ties
    labels = rng.random(40) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert detection_auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)


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


def test_write_influences_zarr_resumes_and_checks_metadata(tmp_path: Path) -> None:
    import torch
    import zarr

    from conftest import classification_data, loader, make_mlp
    from influx.cli import write_influences_zarr
    from influx.torch import DirectInfluence

    x, y = classification_data(30)
    x_test, y_test = classification_data(9, seed=3)
    model = DirectInfluence(make_mlp(), torch.nn.functional.cross_entropy, 0.01).fit(loader(x, y))
    out = tmp_path / "m.zarr"
    write_influences_zarr(model, x_test, y_test, x, y, out, chunk_size=4, metadata={"seed": 1})
    stored = zarr.open_array(out, mode="r")
    np.testing.assert_allclose(stored[...], model.influences(x_test, y_test, x, y).numpy())
    assert stored.attrs["influx"]["seed"] == 1 and stored.attrs["influx"]["complete"]
    write_influences_zarr(model, x_test, y_test, x, y, out, chunk_size=4, metadata={"seed": 1})
    with pytest.raises(ValueError, match="holds seed=1, this computation has seed=2"):
        write_influences_zarr(model, x_test, y_test, x, y, out, chunk_size=4, metadata={"seed": 2})


@pytest.mark.slow
def test_demo_writes_zarr(tmp_path: Path) -> None:
    import zarr

    out = tmp_path / "influences.zarr"
    assert main(["demo", "--no-progress", "--out", str(out)]) == 0
    stored = zarr.open_array(out, mode="r")
    assert stored.shape == (597, 1200)
    assert np.isfinite(stored[...]).all()
    assert stored.attrs["influx"]["source"] == "influx demo --seed 0"
