"""The training-loop tracker: its rankings are the library's, and the training is unchanged."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import torch
from influx.errors import UnorderedDataError
from influx.torch import (
    DirectInfluence,
    EkfacInfluence,
    InfluenceTracker,
    Task,
    rank_training_points,
)

N_TRAIN, N_VAL = 48, 20


def _data(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_VAL, 4, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    y[:4] = (y[:4] + 1) % 3  # a few flipped labels
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


SEEN_FLAGS: set = set()


class Seen(torch.nn.Module):
    """The identity, recording the train/eval flags it is called with (in a global: influx
    calls the forward pass of a copy of the module's structure)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN_FLAGS.add(self.training)
        return x


def _net() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.2),
        Seen(),
        torch.nn.Linear(6, 3),
    )


def _loaders() -> Tuple[DataLoader, DataLoader, DataLoader]:
    x, y, x_val, y_val = _data()
    shuffled = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    ordered = DataLoader(TensorDataset(x, y), batch_size=16)
    validation = DataLoader(
        TensorDataset(x_val, y_val),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(5),
    )
    return shuffled, ordered, validation


def _train(
    epochs: int = 3, tracker_options: Optional[Dict[str, Any]] = None
) -> Tuple[torch.nn.Module, Dict[str, Any], List[Any], Optional[InfluenceTracker]]:
    """A training loop drawing from every random stream; the tracker if options are given."""
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    net = _net()
    shuffled, ordered, validation = _loaders()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    tracker = None
    if tracker_options is not None:
        tracker = InfluenceTracker(
            net, F.cross_entropy, ordered, validation, learning_rate=optimizer, **tracker_options
        )
    draws: List[Any] = []
    net.train()
    for _ in range(epochs):
        for x, y in shuffled:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            if tracker is not None:
                tracker.on_step()
        draws.append((torch.rand(1).item(), np.random.rand(), random.random()))
        if tracker is not None:
            tracker.on_epoch_end()
    return net, optimizer.state_dict(), draws, tracker


def test_training_with_the_tracker_is_bit_identical(tmp_path: Path) -> None:
    SEEN_FLAGS.clear()
    reference, optimizer_state, draws, _ = _train()
    assert SEEN_FLAGS == {True}
    options = dict(
        method="ekfac",
        regularization=0.01,
        rank_every=1,
        checkpoint_every_steps=2,
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_averaging="tracin",
        report_dir=tmp_path / "report",
        plots=False,
    )
    tracked, tracked_optimizer_state, tracked_draws, tracker = _train(tracker_options=options)
    assert tracker is not None and len(tracker.rankings) == 3 and len(tracker.checkpoints) == 4
    for (name, p), q in zip(reference.state_dict().items(), tracked.state_dict().values()):
        assert torch.equal(p, q), name
    for (name, p), q in zip(reference.named_parameters(), tracked.parameters()):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad), name
    for state, tracked_state in zip(
        optimizer_state["state"].values(), tracked_optimizer_state["state"].values()
    ):
        for key in state:
            assert torch.equal(state[key], tracked_state[key]), key
    assert draws == tracked_draws
    # the tracker ranked in eval mode; the loop's mode is back
    assert SEEN_FLAGS == {True, False} and all(m.training for m in tracked.modules())
    generator_state = tracker.validation_loader.generator.get_state()
    tracker.finish()
    assert torch.equal(tracker.validation_loader.generator.get_state(), generator_state)
    assert (tmp_path / "report" / "epoch_2" / "ranking.csv").exists()
    assert not list((tmp_path / "report").rglob("*.png"))


class DictTask(Task):
    """Cross-entropy of a model called on the `"features"` entry of dict inputs."""

    def loss(self, model: Any, x: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x["features"]), y)


class DictData(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"features": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("method", ["ekfac", "direct-task"])
def test_final_ranking_is_rank_training_points_on_the_final_model(method: str) -> None:
    net, _, _, _ = _train()
    x, y, x_val, y_val = _data()
    if method == "ekfac":
        loss: Any = F.cross_entropy
        train = DataLoader(TensorDataset(x, y), batch_size=16)
        validation = DataLoader(TensorDataset(x_val, y_val), batch_size=8)
        name = "ekfac"
    else:
        loss = DictTask()
        train = DataLoader(DictData(x, y), batch_size=16)
        validation = DataLoader(DictData(x_val, y_val), batch_size=8)
        name = "direct"
    net.train()
    net[2].eval()  # mixed modes are restored module by module
    ranking = InfluenceTracker(net, loss, train, validation, name, regularization=0.01).finish()
    assert [m.training for m in net] == [True, True, False, True, True]
    net.eval()
    if method == "ekfac":
        reference_model: Any = EkfacInfluence(net, True, loss=loss, regularization=0.01)
    else:
        reference_model = DirectInfluence(net, loss, regularization=0.01)
    reference = rank_training_points(reference_model.fit(train), train, validation)
    assert ranking.values.dtype == torch.float64
    torch.testing.assert_close(ranking.values, reference.values, rtol=0, atol=1e-8)
    assert torch.equal(ranking.indices, reference.indices)


def _per_sample_grads(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for xi, yi in zip(x, y):
        loss = F.cross_entropy(net(xi[None]), yi[None])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, net.parameters())]))
    return torch.stack(rows)


@pytest.mark.parametrize("checkpoint_format", ["torch", "safetensors", "memory"])
def test_tracin_is_the_learning_rate_weighted_sum_of_gradient_products(
    tmp_path: Path, checkpoint_format: str
) -> None:
    options: Dict[str, Any] = dict(checkpoint_every=1, checkpoint_averaging="tracin")
    if checkpoint_format != "memory":
        options.update(checkpoint_dir=tmp_path, checkpoint_format=checkpoint_format)
    net, _, _, tracker = _train(tracker_options=options)
    assert tracker is not None
    ranking = tracker.finish()
    x, y, x_val, y_val = _data()
    shadow = copy.deepcopy(net).eval()
    expected = torch.zeros(N_TRAIN)
    for checkpoint in tracker.checkpoints:
        assert (checkpoint.path is None) == (checkpoint_format == "memory")
        shadow.load_state_dict(checkpoint.load(), strict=False)
        summed = _per_sample_grads(shadow, x_val, y_val).sum(0)
        expected += checkpoint.learning_rate * (_per_sample_grads(shadow, x, y) @ summed)
    assert [c.learning_rate for c in tracker.checkpoints] == [0.05] * 3
    torch.testing.assert_close(ranking.values, expected, rtol=1e-10, atol=1e-12)


def test_checkpoint_averaged_influence_is_the_mean_over_checkpoints() -> None:
    options: Dict[str, Any] = dict(
        method="direct", regularization=0.01, checkpoint_every=1, checkpoint_averaging="influence"
    )
    net, _, _, tracker = _train(tracker_options=options)
    assert tracker is not None
    ranking = tracker.finish()
    _, ordered, validation = _loaders()
    expected = torch.zeros(N_TRAIN)
    for checkpoint in tracker.checkpoints:
        shadow = copy.deepcopy(net).eval()
        shadow.load_state_dict(checkpoint.load(), strict=False)
        model = DirectInfluence(shadow, F.cross_entropy, regularization=0.01).fit(ordered)
        expected += rank_training_points(model, ordered, validation).values / 3
    torch.testing.assert_close(ranking.values, expected, rtol=1e-10, atol=1e-12)
    assert ranking.converged and ranking.solver_diagnostics is not None
    assert len(ranking.solver_diagnostics) == 3
    # the final model's ranking is still at hand
    assert not torch.allclose(tracker.rank(None).values, ranking.values)


def test_report_with_suspected_points(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, ordered, validation = _loaders()
    net, _, _, _ = _train()
    tracker = InfluenceTracker(
        net,
        F.cross_entropy,
        ordered,
        validation,
        method="direct",
        regularization=0.01,
        suspected=torch.arange(4),
        report_dir=tmp_path,
        top_k=3,
    )
    ranking = tracker.finish()
    rows = (tmp_path / "ranking.csv").read_text().splitlines()
    assert rows[0] == "rank,index,influence,suspected" and len(rows) == N_TRAIN + 1
    assert rows[1].split(",")[1] == str(int(ranking.indices[0]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["index"] for e in summary["most_harmful"]] == ranking.indices[:3].tolist()
    order = ranking.indices.tolist()
    positions = [order.index(i) for i in range(4)]
    pairs = sum(p < q for p in positions for q in range(N_TRAIN) if q not in positions)
    assert summary["detection_auc"] == pytest.approx(pairs / (4 * (N_TRAIN - 4)))
    curve = np.loadtxt(tmp_path / "detection_curve.csv", delimiter=",", skiprows=1)
    assert curve.shape == (N_TRAIN, 2) and curve[-1, 1] == 1.0
    for name in ("influence_distribution.png", "detection_curve.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(method="newton"), ValueError, "Parameter 'method' must be one of"),
        (dict(method=3), TypeError, "Parameter 'method' must be a method name"),
        (dict(method_options={"bogus": 1}), ValueError, "Parameter 'method_options' names"),
        (dict(rank_every=0), ValueError, "Parameter 'rank_every' must be a positive int"),
        (dict(checkpoint_every=1.5), TypeError, "Parameter 'checkpoint_every'"),
        (dict(checkpoint_format="npz"), ValueError, "Parameter 'checkpoint_format'"),
        (dict(checkpoint_averaging="swa"), ValueError, "Parameter 'checkpoint_averaging'"),
        (dict(learning_rate="0.1"), TypeError, "Parameter 'learning_rate'"),
        (dict(top_k=0), ValueError, "Parameter 'top_k'"),
        (dict(loss=3), TypeError, "Parameter 'loss' must be a loss function"),
        (dict(validation_loader=5), TypeError, "Parameter 'validation_loader' must be"),
    ],
)
def test_bad_arguments_name_the_parameter(options: Dict[str, Any], error: type, match: str) -> None:
    _, ordered, validation = _loaders()
    arguments: Dict[str, Any] = dict(
        model=_net(), loss=F.cross_entropy, train_loader=ordered, validation_loader=validation
    )
    with pytest.raises(error, match=match):
        InfluenceTracker(**{**arguments, **options})


def test_a_shuffled_training_loader_is_refused() -> None:
    shuffled, _, validation = _loaders()
    with pytest.raises(UnorderedDataError, match="Parameter 'train_loader'.*shuffle=True"):
        InfluenceTracker(_net(), F.cross_entropy, shuffled, validation)


def test_errors_at_ranking_time(tmp_path: Path) -> None:
    _, ordered, validation = _loaders()
    tracker = InfluenceTracker(
        _net(), F.cross_entropy, ordered, validation, "direct", 0.01, suspected=[N_TRAIN]
    )
    with pytest.raises(ValueError, match="needs checkpoints"):
        tracker.rank("tracin")
    with pytest.raises(ValueError, match=r"Parameter 'suspected' must hold training indices"):
        tracker.finish()
    custom = InfluenceTracker(
        _net(), F.cross_entropy, ordered, validation, method=lambda model, loss: model
    )
    with pytest.raises(TypeError, match="Parameter 'method' must return an influence model"):
        custom.finish()
