"""The demo: finds flipped labels and writes the influence matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from influx.cli import detection_auc, main, plot_report, run_demo


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # with ties
    labels = rng.random(40) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert detection_auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)


def test_demo_smoke(tmp_path: Path, deterministic: None) -> None:
    """The demo once, with a smaller network and shorter training than the command's
    defaults: it finds the flipped labels, and its matrix, zarr and plot outputs are written."""
    import zarr

    from influx.cli import write_influences_zarr

    report = run_demo(hidden=8, epochs=60, progress=False, with_matrix=True)
    assert report.n_train == 1200 and report.n_test == 597 and report.n_flipped == 120
    # Seeds 0-5 give a held-out accuracy of 0.938-0.955 and an AUC of 0.931-0.964 here:
    # first that the model learned the digits, then that the ranking finds the flips.
    assert report.test_accuracy > 0.9, report.test_accuracy
    assert report.auc > 0.85
    assert report.influences is not None and report.influences.shape == (597, 1200)
    assert np.isfinite(report.influences).all()
    assert any("Detection AUC" in line for line in report.lines())
    x_test, y_test, x, y = report.data
    out = write_influences_zarr(
        report.model, x_test, y_test, x, y, tmp_path / "m.zarr", metadata={"source": "demo"}
    )
    stored = zarr.open_array(out, mode="r")
    assert stored.shape == (597, 1200) and stored.attrs["influx"]["source"] == "demo"
    np.testing.assert_allclose(stored[...], report.influences, rtol=1e-10, atol=1e-12)
    pytest.importorskip("matplotlib")
    assert plot_report(report, tmp_path / "demo.png").stat().st_size > 10_000


def test_write_influences_zarr_resumes_and_checks_metadata(tmp_path: Path) -> None:
    import zarr

    import torch
    from helpers import classification_data, loader, make_mlp
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


def test_demo_command_prints_its_results_on_standard_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], deterministic: None
) -> None:
    """`influx demo > report.txt` keeps the report: results on stdout, messages on stderr."""
    plot = tmp_path / "demo.png"
    args = ["demo", "--hidden", "8", "--epochs", "60", "--no-progress", "--plot", str(plot)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert any(
        line.startswith("Detection AUC (flipped vs clean, by harmfulness): 0.") for line in lines
    )
    assert f"Plots written to {plot}" in lines
    assert "Detection AUC" not in err
