"""Fit files written by an earlier layout of the package still load.

`tests/data/fits/` holds fits saved before `influx.torch` was regrouped into role packages
(one file per family of operators, a few kilobytes each) and the influences they gave. A file
records class names and settings, never module paths: loading it rebuilds the operators from
the registry wherever their modules now live. Run this module as a script to write the files
again (only when the file format changes on purpose).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    ComposedInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    KroneckerCurvature,
    NystroemSolver,
    SecondOrderMode,
    TorchComposableInfluence,
)

F = torch.nn.functional
FITS = Path(__file__).resolve().parents[2] / "data" / "fits"


def _network() -> torch.nn.Module:
    """A 4-5-3 MLP whose weights are a formula of their index (no random generator)."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    net = net.to(torch.float64)
    with torch.no_grad():
        for k, p in enumerate(net.parameters()):
            index = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_(0.5 * torch.sin(1.3 * index + k).reshape(p.shape))
    return net.eval()


def _data() -> Tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(24 * 4, dtype=torch.float64)
    x = torch.cos(0.7 * index).reshape(24, 4)
    y = torch.arange(24) % 3
    return x, y


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(*_data()), batch_size=8)


MODELS: Dict[str, Callable[[torch.nn.Module], TorchComposableInfluence]] = {
    "direct_layer_wise": lambda net: DirectInfluence(
        net, F.cross_entropy, 0.1, block_structure=BlockMode.LAYER_WISE
    ),
    "cg": lambda net: CgInfluence(net, F.cross_entropy, 0.1),
    "arnoldi": lambda net: ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=4),
    "inverse_harmonic_mean": lambda net: InverseHarmonicMeanInfluence(
        net, F.cross_entropy, 0.1, second_order_mode=SecondOrderMode.GAUSS_NEWTON
    ),
    "ekfac": lambda net: EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1),
    "kfac_nystroem": lambda net: ComposedInfluence(
        net, F.cross_entropy, KroneckerCurvature(), NystroemSolver(rank=6, seed=1), 0.1
    ),
}


def _influences(model: TorchComposableInfluence) -> torch.Tensor:
    x, y = _data()
    return model.influences(x[:3], y[:3], x, y)


def write_fits() -> None:
    """Fit every model of `MODELS`, save its fit and the influences it gives."""
    FITS.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, make in MODELS.items():
        model = make(_network()).fit(_loader())
        model.save(FITS / f"{name}.pt")
        expected[name] = _influences(model).tolist()
    (FITS / "influences.json").write_text(json.dumps(expected))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fit_written_by_the_earlier_layout_loads(name: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="influx.torch.composition.persistence")
    model = MODELS[name](_network())
    try:
        model.load_fit(FITS / f"{name}.pt")
    except ValueError as error:
        # operators that apply the curvature through the training data need it again
        assert "Parameter 'data' is required" in str(error)
        model.load_fit(FITS / f"{name}.pt", data=_loader())
    expected = torch.tensor(json.loads((FITS / "influences.json").read_text())[name])
    torch.testing.assert_close(_influences(model), expected, rtol=1e-9, atol=1e-12)
    # written before frozen parameters, buffers and the loss were recorded: a logged note
    assert "predates the fingerprint of frozen parameters and buffers" in caplog.text


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    sys.exit(write_fits())
