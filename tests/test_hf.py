"""Hugging Face models end to end: a tiny BERT built from a config (nothing downloaded).

Skipped without `transformers` (`pip install influx[hf]`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader

import torch

pytest.importorskip("transformers")

from influx.torch import (  # noqa: E402
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    NotImplementedLayerRepresentationException,
    SecondOrderMode,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import text_classification as tc  # noqa: E402

GN = SecondOrderMode.GAUSS_NEWTON


@pytest.fixture(scope="module")
def bert() -> Tuple[torch.nn.Module, Dict[str, torch.Tensor], torch.Tensor]:
    x, y, _ = tc.token_data(60, seed=3)
    net = tc.train(tc.tiny_bert(seed=3), x, y, steps=60)
    for name, parameter in net.named_parameters():
        if "embeddings" in name:
            parameter.requires_grad_(False)
    assert bool((x["attention_mask"] == 0).any())  # the batches contain padding
    return net, x, y


def _first(x: Dict[str, torch.Tensor], y: torch.Tensor, n: int) -> Tuple[Dict[str, Any], Any]:
    return {k: v[:n] for k, v in x.items()}, y[:n]


def test_direct_and_cg_agree_on_padded_batches(bert: Any) -> None:
    """2-D padding masks, the model's own calling convention: `model(**x).logits`."""
    net, x, y = bert
    loader = DataLoader(tc.TokenDataset(x, y), batch_size=20)
    direct = DirectInfluence(net, F.cross_entropy, regularization=0.1, second_order_mode=GN)
    cg = CgInfluence(net, F.cross_entropy, regularization=0.1, rtol=1e-12, second_order_mode=GN)
    direct.fit(loader)
    cg.fit(loader)
    x_test, y_test = _first(x, y, 4)
    x_train, y_train = _first(x, y, 12)
    reference = direct.influences(x_test, y_test, x_train, y_train)
    torch.testing.assert_close(
        cg.influences(x_test, y_test, x_train, y_train), reference, rtol=1e-6, atol=1e-8
    )
    # The 4-D mask of the task (vmapped) gives the influences of the 2-D mask (one sample
    # at a time).
    task = DirectInfluence(
        net, tc.SequenceClassification(), regularization=0.1, second_order_mode=GN
    )
    torch.testing.assert_close(
        task.fit(loader).influences(x_test, y_test, x_train, y_train),
        reference,
        rtol=1e-10,
        atol=1e-12,
    )


def test_ekfac_on_the_linear_layers(bert: Any) -> None:
    net, x, y = bert
    loader = DataLoader(tc.TokenDataset(x, y), batch_size=20)
    # The layer norms have no Kronecker-factored representation: a clear error if asked...
    with pytest.raises(NotImplementedLayerRepresentationException, match="LayerNorm"):
        EkfacInfluence(
            net, True, loss=F.cross_entropy, regularization=0.01, other_layers="error"
        ).fit(loader)
    # ... the model restricted to Linear layers (3-D activations in the encoder).
    layers = [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.intermediate.dense",
        "bert.pooler.dense",
        "classifier",
    ]
    model = EkfacInfluence(
        net, True, loss=tc.SequenceClassification(), regularization=0.01, layers=layers
    )
    model.fit(loader)
    assert model.block_names == layers
    x_test, y_test = _first(x, y, 3)
    values = model.influences(x_test, y_test, x, y)
    assert values.shape == (3, 60) and bool(torch.isfinite(values).all())
    # The plain loss on 2-D masks gives the same factors.
    plain = EkfacInfluence(net, True, loss=F.cross_entropy, regularization=0.01, layers=layers)
    torch.testing.assert_close(
        plain.fit(loader).influences(x_test, y_test, x, y), values, rtol=1e-8, atol=1e-10
    )


def test_flipped_labels_are_found(deterministic: None) -> None:
    """The example's training converges for every seed from 0 to 11 (validation accuracy
    97-100 %, EK-FAC and CG AUC 0.87-1.00); the test first checks that the model learned the
    task, then that both methods find the flipped labels."""
    result = tc.main(n_train=400, n_val=100, seed=0)
    assert result.accuracy >= 0.95, f"the classifier did not learn the task: {result.accuracy}"
    assert result.auc["EK-FAC"] >= 0.85
    assert result.auc["CG"] >= 0.85
