"""EkfacInfluence on whole models: every Linear / Conv2d layer by default, the other
trainable modules (batch and layer norms, embeddings) held fixed or refused."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

import torch
from helpers import loader, rel_err
from influx.torch import EkfacInfluence, NotImplementedLayerRepresentationException

F = torch.nn.functional


def cnn_with_batch_norm() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.BatchNorm2d(3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 2 * 2, 3),
    )
    with torch.no_grad():  # running statistics other than the initial ones
        for module in net:
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_batch_norm_is_held_fixed_by_default(caplog: pytest.LogCaptureFixture) -> None:
    net = cnn_with_batch_norm()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 1, 6, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    with caplog.at_level(logging.INFO, logger="influx.torch.models.ekfac"):
        model = EkfacInfluence(net, True, loss=F.cross_entropy, regularization=0.01)
    assert model.block_names == ["0", "3", "7"]
    assert model.settings["other_layers"] == "freeze"  # it decides which layers are used
    lines = [r.getMessage() for r in caplog.records if r.name == "influx.torch.models.ekfac"]
    assert len(lines) == 1
    assert "3 Kronecker-factored layers (Conv2d x2, Linear x1)" in lines[0]
    assert "2 other trainable modules held fixed" in lines[0]
    assert "BatchNorm2d x2" in lines[0] and "1, 4" in lines[0]
    values = model.fit(loader(x, y, 10)).influences(x[:4], y[:4], x, y)
    # the same as the model whose batch norms are frozen
    for module in net:
        if isinstance(module, torch.nn.BatchNorm2d):
            module.requires_grad_(False)
    frozen = EkfacInfluence(net, True, loss=F.cross_entropy, regularization=0.01)
    expected = frozen.fit(loader(x, y, 10)).influences(x[:4], y[:4], x, y)
    assert rel_err(values, expected) < 1e-12


def test_other_layers_is_no_setting_of_a_fully_factored_model() -> None:
    """Fits of models whose trainable modules are all factored do not depend on it (and fits
    saved before it existed load)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    assert "other_layers" not in EkfacInfluence(net).settings


def test_other_layers_error() -> None:
    with pytest.raises(NotImplementedLayerRepresentationException, match=r"'1' \(BatchNorm2d\)"):
        EkfacInfluence(cnn_with_batch_norm(), other_layers="error")


def test_tiny_bert_without_listing_layers(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
    import text_classification as tc

    x, y, _ = tc.token_data(12, seed=3)
    net = tc.tiny_bert(seed=3)
    with caplog.at_level(logging.INFO, logger="influx.torch.models.ekfac"):
        model = EkfacInfluence(net, True, loss=F.cross_entropy, regularization=0.01)
    linear = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    assert model.block_names == linear
    assert "LayerNorm x" in caplog.text and "Embedding x3" in caplog.text
    model.fit(DataLoader(tc.TokenDataset(x, y), batch_size=6))
    values = model.influences({k: v[:3] for k, v in x.items()}, y[:3], x, y)
    assert values.shape == (3, 12) and bool(torch.isfinite(values).all())
