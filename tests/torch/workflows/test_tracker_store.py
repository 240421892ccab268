"""The gradient store written while training: projected gradients by training index."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.torch import InfluenceTracker, ProjectedInfluence
from references import per_sample_grads

pytest.importorskip("zarr")

N_TRAIN = 40
OPTIONS: Dict[str, Any] = dict(projection_dim=8, regularization=0.01, seed=3)


def _data() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + 12, 5, generator=generator)
    y = (x[:, 0] - x[:, 1] > 0).long()
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _tracker(net: torch.nn.Module, store: Path, **options: Any) -> InfluenceTracker:
    x, y, x_val, y_val = _data()
    return InfluenceTracker(
        net,
        F.cross_entropy,
        DataLoader(TensorDataset(x, y), batch_size=16),
        DataLoader(TensorDataset(x_val, y_val), batch_size=16),
        method="direct",
        regularization=0.01,
        gradient_store=store,
        gradient_store_options=OPTIONS,
        **options,
    )


Step = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]


def _train(
    store: Optional[Path],
    epochs: int = 3,
    reference: Optional[Path] = None,
    last_steps: Optional[List[Step]] = None,
    **options: Any,
) -> Tuple[torch.nn.Module, Optional[InfluenceTracker], Optional[InfluenceTracker]]:
    """Train; with `store`, a tracker records in `on_step`; with `reference`, a second one
    (without capture, every step) records between the backward pass and the optimizer step;
    `last_steps` receives the indices, batch and parameters before the update of each step
    of the last epoch."""
    x, y, _, _ = _data()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    indexed = DataLoader(TensorDataset(torch.arange(N_TRAIN), x, y), batch_size=8, shuffle=True)
    tracker = None if store is None else _tracker(net, store, epochs=epochs, **options)
    before = None
    if reference is not None:
        before = _tracker(net, reference, gradient_store_capture=False, gradient_store_from_epoch=0)
    for epoch in range(epochs):
        for index, x_batch, y_batch in indexed:
            optimizer.zero_grad()
            F.cross_entropy(net(x_batch), y_batch).backward()
            if last_steps is not None and epoch == epochs - 1:
                parameters = {n: p.detach().clone() for n, p in net.named_parameters()}
                last_steps.append((index, x_batch, y_batch, parameters))
            if before is not None:
                before.record_gradients((x_batch, y_batch), index)
            optimizer.step()
            if tracker is not None:
                tracker.on_step(batch=(x_batch, y_batch), indices=index)
        if tracker is not None:
            tracker.on_epoch_end()
    return net, tracker, before


def test_the_store_holds_the_gradients_of_each_points_last_step(tmp_path: Path) -> None:
    """By default the store records the last epoch only."""
    reference, _, _ = _train(None)
    net, tracker, _ = _train(tmp_path / "grads.zarr", gradient_store_capture=False)
    for p, q in zip(reference.parameters(), net.parameters()):
        assert torch.equal(p, q)
    assert tracker is not None and tracker.gradient_store_from_epoch == 2
    tracker.finish()
    store, recorder = tracker.store, tracker.recorder
    assert store is not None and recorder is not None and store.n_train == N_TRAIN
    steps = recorder.recorded_at
    assert steps.min() == 11 and steps.max() == 15  # the last epoch: steps 11 to 15
    # the points of the last step were recorded at the final parameters
    last = torch.as_tensor((steps == 15).nonzero()[0])
    x, y, x_val, y_val = _data()
    model = ProjectedInfluence(net.eval(), F.cross_entropy, **OPTIONS)
    model.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    torch.testing.assert_close(
        torch.as_tensor(store.array[:])[last],
        model.projected_gradients(x[last], y[last]),
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(
        store.influences(x_val, y_val)[:, last],
        model.influences(x_val, y_val, x[last], y[last]),
        rtol=1e-10,
        atol=1e-12,
    )


def test_store_errors(tmp_path: Path) -> None:
    x, y, x_val, y_val = _data()
    net = torch.nn.Sequential(torch.nn.Linear(5, 2))
    tracker = InfluenceTracker(
        net,
        F.cross_entropy,
        DataLoader(TensorDataset(x, y), batch_size=16),
        DataLoader(TensorDataset(x_val, y_val), batch_size=16),
        gradient_store=tmp_path / "grads.zarr",
        gradient_store_options=OPTIONS,
        epochs=1,
    )
    with pytest.raises(ValueError, match="Parameters 'batch' and 'indices' of on_step"):
        tracker.on_step()
    with pytest.raises(ValueError, match="Parameter 'indices' must hold training indices"):
        tracker.on_step(batch=(x[:2], y[:2]), indices=[0, N_TRAIN])
    with pytest.raises(ValueError, match="Parameter 'indices' must have one index per sample"):
        tracker.on_step(batch=(x[:2], y[:2]), indices=[0])
    tracker.on_step(batch=(x[:2], y[:2]), indices=[0, 1])
    with pytest.raises(ValueError, match="misses 38 training points"):
        tracker.finish()
    with pytest.raises(ValueError, match="Parameter 'gradient_store_from_epoch'"):
        InfluenceTracker(net, F.cross_entropy, [], [], gradient_store_from_epoch=-1)
    with pytest.raises(ValueError, match="Parameter 'epochs' must be a positive int, got 0"):
        InfluenceTracker(net, F.cross_entropy, [], [], epochs=0)
    with pytest.raises(ValueError, match="Parameter 'epochs' must be the number of epochs"):
        InfluenceTracker(net, F.cross_entropy, [], [], gradient_store=tmp_path / "g.zarr")


def test_captured_gradients_are_those_of_the_training_step(tmp_path: Path) -> None:
    """Captured from the loop's own passes (every step): the gradients before the optimizer's
    update, as a pass of the tracker between the backward pass and the update computes them,
    and as the Kronecker projection of the explicit per-sample gradients at those parameters
    (float64)."""
    reference, _, _ = _train(None)
    last_steps: List[Step] = []
    net, tracker, before = _train(
        tmp_path / "captured.zarr",
        reference=tmp_path / "pass.zarr",
        last_steps=last_steps,
        gradient_store_from_epoch=0,
    )
    for p, q in zip(reference.parameters(), net.parameters()):
        assert torch.equal(p, q)
    assert tracker is not None and before is not None
    assert tracker.recorder is not None and tracker.recorder.captured_steps == 15
    assert before.recorder is not None and before.recorder.captured_steps == 0
    tracker.finish()
    assert all(not m._forward_hooks for m in net.modules())  # the hooks are removed
    before.finish()
    assert tracker.store is not None and before.store is not None
    torch.testing.assert_close(
        torch.as_tensor(tracker.store.array[:]),
        torch.as_tensor(before.store.array[:]),
        rtol=1e-10,
        atol=1e-12,
    )
    stored = torch.as_tensor(tracker.store.array[:])
    assert stored.dtype == torch.float64
    layers = tracker.recorder.layers.values()
    assert len(last_steps) == 5  # the last epoch: every training point once
    for index, x_batch, y_batch, parameters in last_steps:
        flat = per_sample_grads(net, F.cross_entropy, parameters, x_batch, y_batch)
        sizes = [p.numel() for p in parameters.values()]
        parts = {
            name: part.reshape(-1, *parameters[name].shape)
            for name, part in zip(parameters, flat.split(sizes, dim=1))
        }
        expected = torch.cat([layer.project_gradient(parts) for layer in layers], dim=1)
        torch.testing.assert_close(stored[index], expected, rtol=1e-10, atol=1e-12)
