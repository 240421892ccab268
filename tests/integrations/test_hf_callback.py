"""The Hugging Face Trainer callback on a tiny BERT built from a config (nothing downloaded).

The callback's hooks are called as the Trainer calls them, with transformers' own
`TrainerState` and `TrainerControl`; with `accelerate` installed, a `Trainer` runs it end to
end. Skipped without `transformers` (`pip install influx[hf]`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader

import torch

pytest.importorskip("transformers")

from transformers import TrainerControl, TrainerState  # noqa: E402

from influx.integrations.huggingface import InfluenceCallback  # noqa: E402
from influx.torch import EkfacInfluence, rank_training_points  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import text_classification as tc  # noqa: E402

LAYERS = [
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.0.intermediate.dense",
    "bert.pooler.dense",
    "classifier",
]
OPTIONS: Dict[str, Any] = dict(
    method="ekfac", regularization=0.01, method_options={"layers": LAYERS}
)


def _datasets() -> Tuple[tc.TokenDataset, tc.TokenDataset]:
    x, y, _ = tc.token_data(40, seed=3, flip_fraction=0.1)
    x_val, y_val, _ = tc.token_data(16, seed=4)
    return tc.TokenDataset(x, y), tc.TokenDataset(x_val, y_val)


def _train_with_hooks(
    callback: Optional[InfluenceCallback],
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Two epochs of AdamW on shuffled batches, calling the hooks where the Trainer does."""
    train, _ = _datasets()
    torch.manual_seed(0)
    net = tc.tiny_bert(seed=3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.02)
    loader = DataLoader(train, batch_size=20, shuffle=True)
    state, control = TrainerState(), TrainerControl()
    hooks = dict(model=net, optimizer=optimizer)
    if callback is not None:
        callback.on_train_begin(None, state, control, **hooks)
    net.train()
    for epoch in range(2):
        for batch in loader:
            labels = batch.pop("labels")
            optimizer.zero_grad()
            F.cross_entropy(net(**batch).logits, labels).backward()
            optimizer.step()
            state.global_step += 1
            if callback is not None:
                callback.on_step_end(None, state, control, **hooks)
        state.epoch = epoch + 1
        if callback is not None:
            callback.on_epoch_end(None, state, control, **hooks)
    if callback is not None:
        callback.on_train_end(None, state, control, **hooks)
    return net, optimizer.state_dict()


def _reference(net: torch.nn.Module) -> Any:
    train, validation = _datasets()
    model = EkfacInfluence(
        net.eval(), True, loss=tc.SequenceClassification(), regularization=0.01, layers=LAYERS
    )
    train_loader = DataLoader(train, batch_size=16)
    return rank_training_points(
        model.fit(train_loader), train_loader, DataLoader(validation, batch_size=16)
    )


def test_the_hooks_rank_without_changing_the_training(tmp_path: Path) -> None:
    reference_net, reference_optimizer = _train_with_hooks(None)
    train, validation = _datasets()
    callback = InfluenceCallback(
        train,
        validation,
        tc.SequenceClassification(),
        batch_size=16,
        checkpoint_every_steps=2,
        rank_every=2,
        report_dir=tmp_path,
        plots=False,
        **OPTIONS,
    )
    net, optimizer = _train_with_hooks(callback)
    for (name, p), q in zip(reference_net.state_dict().items(), net.state_dict().values()):
        assert torch.equal(p, q), name
    for state, other in zip(reference_optimizer["state"].values(), optimizer["state"].values()):
        assert all(torch.equal(state[key], other[key]) for key in state)
    assert net.training
    tracker = callback.tracker
    assert tracker is not None and sorted(tracker.rankings) == [2]
    assert [c.step for c in tracker.checkpoints] == [2, 4]
    assert [c.learning_rate for c in tracker.checkpoints] == [0.02, 0.02]
    assert callback.ranking is not None
    reference = _reference(net)
    torch.testing.assert_close(callback.ranking.values, reference.values, rtol=0, atol=1e-8)
    assert (tmp_path / "ranking.csv").exists() and (tmp_path / "epoch_2" / "ranking.csv").exists()


def test_bad_arguments_name_the_parameter() -> None:
    train, validation = _datasets()
    with pytest.raises(ValueError, match="Parameter 'batch_size' must be a positive int"):
        InfluenceCallback(train, validation, batch_size=0)
    with pytest.raises(TypeError, match="Parameter 'loss' must be a Task"):
        InfluenceCallback(train, validation, loss=3)
    with pytest.raises(TypeError, match="Parameter 'data_collator' must be callable"):
        InfluenceCallback(train, validation, data_collator="pad")
    with pytest.raises(TypeError, match="Parameter 'learning_rate' is read from the Trainer"):
        InfluenceCallback(train, validation, learning_rate=0.1)
    with pytest.raises(TypeError, match="Parameter 'gradient_store' is not available"):
        InfluenceCallback(train, validation, gradient_store="grads.zarr")
    callback = InfluenceCallback(train, validation, method="newton")
    with pytest.raises(ValueError, match="Parameter 'method' must be one of"):
        callback.on_train_begin(None, TrainerState(), TrainerControl(), model=tc.tiny_bert())


def test_trainer_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    train, validation = _datasets()
    callback = InfluenceCallback(
        train,
        validation,
        tc.SequenceClassification(),
        batch_size=16,
        rank_every=1,
        checkpoint_every_steps=1,
        **OPTIONS,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=20,
        learning_rate=0.02,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    net = tc.tiny_bert(seed=3)
    Trainer(net, args, train_dataset=train, callbacks=[callback]).train()
    assert callback.ranking is not None and callback.ranking.values.shape == (40,)
    assert callback.tracker is not None and sorted(callback.tracker.rankings) == [1, 2]
    assert len(callback.tracker.checkpoints) == 4
    untracked = tc.tiny_bert(seed=3)
    Trainer(untracked, args, train_dataset=train).train()
    for (name, p), q in zip(untracked.state_dict().items(), net.state_dict().values()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(callback.ranking.values, _reference(net).values, rtol=0, atol=1e-8)
