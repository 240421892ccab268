"""ProjectedInfluence with tasks and structured batches.

With an orthogonal projection of full dimension, ProjectedInfluence on a model called with
keyword arguments (float token features and an integer attention mask, outputs with
`logits`), with a loss function or a task whose measurement differs from its loss, equals
DirectInfluence with the same curvature (float64, 1e-8); so does the plain tensor path through
a task. The Sequential and Dask calculators and the training-gradient store on structured
batches equal the in-memory influences.
"""

from __future__ import annotations

from collections import UserDict
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.calculator import DaskInfluenceCalculator, SequentialInfluenceCalculator
from influx.torch import (
    DirectInfluence,
    InfluenceMode,
    NestedTorchCatAggregator,
    ProjectedInfluence,
    SecondOrderMode,
    SupervisedTask,
    Task,
)
from influx.torch.util import TorchNumpyConverter
from influx.torch.workflows.gradient_store import GradientStore

GN, GGN = SecondOrderMode.GAUSS_NEWTON, SecondOrderMode.GENERALIZED_GAUSS_NEWTON
UP, PERTURBATION = InfluenceMode.Up, InfluenceMode.Perturbation
LAMBDA = 0.1
N_TRAIN, N_TEST, LENGTH, WIDTH, CLASSES = 20, 5, 4, 3, 3
FULL = 10_000  # more than the number of parameters: a square orthogonal projection


class Output:
    """A model output with `logits`, as a Hugging Face `ModelOutput`."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class TokenNet(torch.nn.Module):
    """Float token features `(N, T, WIDTH)` and an integer mask `(N, T)`, by keyword: a
    Linear layer on the sequence (called with a keyword argument), a layer norm, a masked mean
    and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.encoder = torch.nn.Linear(WIDTH, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Output:
        h = self.norm(torch.tanh(self.encoder(input=input_ids)))
        weights = attention_mask[..., None].to(h.dtype)
        return Output(self.head((h * weights).sum(1) / weights.sum(1)))


def _data(n: int, seed: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, LENGTH, WIDTH, generator=gen)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[::2, LENGTH - 1 :] = 0
    mask[::3, LENGTH - 2 :] = 0
    return {"input_ids": features, "attention_mask": mask}, torch.randint(
        0, CLASSES, (n,), generator=gen
    )


class _Collated(Dataset):
    """Hugging Face collator style items (`"labels"` is y), or `(x, y)` pairs."""

    def __init__(self, x: Dict[str, torch.Tensor], y: torch.Tensor, mapping: bool = True):
        self.x, self.y, self.mapping = x, y, mapping

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        x = {k: v[i] for k, v in self.x.items()}
        return {**x, "labels": self.y[i]} if self.mapping else (x, self.y[i])


def _loader(x: Dict[str, torch.Tensor], y: torch.Tensor, mapping: bool = True) -> DataLoader:
    return DataLoader(_Collated(x, y, mapping), batch_size=8)


class MarginTask(Task):
    """Cross-entropy for training, the classification margin on the test side; calls the
    model itself with keyword arguments."""

    def loss(self, model: Any, x: Any, y: Any) -> torch.Tensor:
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        return F.cross_entropy(out.logits, y)

    def measurement(self, model: Any, x: Any, y: Any) -> torch.Tensor:
        logits = model(**x).logits
        correct = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(y, CLASSES).bool(), -1e9)
        return (others.logsumexp(1) - correct).mean()


@pytest.fixture(scope="module")
def data() -> Tuple[Any, ...]:
    x, y = _data(N_TRAIN, 1)
    x_test, y_test = _data(N_TEST, 2)
    return x, y, x_test, y_test


def _pair(
    loss: Any, projection: str, mode: SecondOrderMode, data: Tuple[Any, ...]
) -> Tuple[ProjectedInfluence, DirectInfluence]:
    x, y, _, _ = data
    net = TokenNet()
    projected = ProjectedInfluence(net, loss, FULL, projection, mode, LAMBDA, seed=3)
    direct = DirectInfluence(net, loss, LAMBDA, second_order_mode=mode)
    return projected.fit(_loader(x, y)), direct.fit(_loader(x, y, mapping=False))


CASES = [
    ("function", "kronecker", GN),
    ("function", "kronecker", GGN),
    ("function", "gaussian", GGN),
    ("task", "kronecker", GN),
    ("task", "gaussian", GN),
]


@pytest.mark.parametrize("loss_kind, projection, mode", CASES)
def test_dict_inputs_equal_direct_at_full_dimension(
    loss_kind: str, projection: str, mode: SecondOrderMode, data: Tuple[Any, ...]
) -> None:
    x, y, x_test, y_test = data
    loss = MarginTask() if loss_kind == "task" else F.cross_entropy
    projected, direct = _pair(loss, projection, mode, data)
    assert projected.factor_size == direct.n_parameters
    for influence_mode in (UP, PERTURBATION):
        expected = direct.influences(x_test, y_test, x, y, mode=influence_mode)
        values = projected.influences(x_test, y_test, x, y, mode=influence_mode)
        assert values.shape == expected.shape
        assert rel_err(values, expected) < 1e-8
        factors = projected.influence_factors(x_test, y_test)
        from_factors = projected.influences_from_factors(factors, x, y, mode=influence_mode)
        assert rel_err(from_factors, expected) < 1e-8
        self_expected = direct.self_influences(x, y, mode=influence_mode)
        assert rel_err(projected.self_influences(x, y, mode=influence_mode), self_expected) < 1e-8
    # a Mapping that is not a dict (a tokenizer's BatchEncoding) and a positional tuple
    encoding = projected.influence_factors(UserDict(x_test), y_test)
    assert torch.equal(encoding, projected.influence_factors(x_test, y_test))
    if loss_kind == "function":
        as_tuple = (x_test["input_ids"], x_test["attention_mask"])
        assert torch.equal(projected.influence_factors(as_tuple, y_test), encoding)


def test_the_measurement_is_the_test_side_only(data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data
    with_task, _ = _pair(MarginTask(), "kronecker", GN, data)
    plain, _ = _pair(F.cross_entropy, "kronecker", GN, data)
    # the training side is the task's loss, cross-entropy: the same curvature and gradients
    assert torch.equal(with_task.projected_gradients(x, y), plain.projected_gradients(x, y))
    assert rel_err(with_task.self_influences(x, y), plain.self_influences(x, y)) < 1e-12
    # the test side differentiates the margin, not the loss
    margin = with_task.projected_gradients(x_test, y_test, measurement=True)
    loss = plain.projected_gradients(x_test, y_test, measurement=True)
    assert rel_err(margin, loss) > 0.1
    with pytest.raises(TypeError, match="'measurement' must be a bool, got str"):
        plain.projected_gradients(x_test, y_test, measurement="yes")  # type: ignore[arg-type]


class PlainTask(SupervisedTask):
    """Cross-entropy as a task, with twice the loss as the measurement."""

    def measurement(self, model: Any, x: Any, y: Any) -> torch.Tensor:
        return 2.0 * self.loss(model, x, y)


@pytest.mark.parametrize("projection", ["kronecker", "gaussian"])
def test_tensor_inputs_through_a_task_equal_direct(projection: str) -> None:
    x, y = classification_data(30)
    data = loader(x, y)
    task = PlainTask(F.cross_entropy)
    projected = ProjectedInfluence(make_mlp(), task, FULL, projection, GN, LAMBDA).fit(data)
    direct = DirectInfluence(make_mlp(), task, LAMBDA, second_order_mode=GN).fit(data)
    plain = ProjectedInfluence(make_mlp(), F.cross_entropy, FULL, projection, GN, LAMBDA)
    plain.fit(data)
    for mode in (UP, PERTURBATION):
        expected = direct.influences(x[:6], y[:6], x, y, mode=mode)
        assert rel_err(projected.influences(x[:6], y[:6], x, y, mode=mode), expected) < 1e-8
        doubled = 2.0 * plain.influences(x[:6], y[:6], x, y, mode=mode)
        assert rel_err(expected, doubled) < 1e-8
    assert rel_err(projected.self_influences(x, y), direct.self_influences(x, y)) < 1e-8


def test_save_and_load_with_a_task_and_dict_inputs(tmp_path: Path, data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data

    def make() -> ProjectedInfluence:
        return ProjectedInfluence(TokenNet(), MarginTask(), 12, regularization=LAMBDA, seed=5)

    model = make().fit(_loader(x, y))
    loaded = make().load_fit(model.save(tmp_path / "projected.fit"))
    expected = model.influences(x_test, y_test, x, y)
    assert torch.equal(loaded.influences(x_test, y_test, x, y), expected)


@pytest.mark.parametrize("projection", ["kronecker", "rademacher"])
def test_sequential_calculator_and_store_with_collator_batches(
    projection: str, tmp_path: Path, data: Tuple[Any, ...]
) -> None:
    x, y, x_test, y_test = data
    model = ProjectedInfluence(TokenNet(), MarginTask(), 16, projection, regularization=LAMBDA)
    model.fit(_loader(x, y))
    expected = model.influences(x_test, y_test, x, y)
    calculator = SequentialInfluenceCalculator(model)
    values = calculator.influences(_loader(x_test, y_test, mapping=False), _loader(x, y))
    computed = values.compute(aggregator=NestedTorchCatAggregator())
    assert torch.allclose(computed, expected, rtol=1e-10, atol=1e-12)
    for preconditioned in (True, False):
        path = tmp_path / f"grads-{preconditioned}.zarr"
        store = GradientStore.write(model, _loader(x, y), path, preconditioned=preconditioned)
        assert store.n_train == N_TRAIN
        scored = store.influences(x_test, y_test)
        assert torch.allclose(scored, expected, rtol=1e-10, atol=1e-12)
    # the raw store holds the projected gradients of the training loss, not of the measurement
    raw = np.asarray(GradientStore(model, tmp_path / "grads-False.zarr").array[:])
    gradients = model.projected_gradients(x, y).numpy()
    np.testing.assert_allclose(raw, gradients, rtol=1e-10, atol=1e-12)


def test_dask_calculator_and_store_with_dict_inputs(
    dask_client: Any, tmp_path: Path, data: Tuple[Any, ...]
) -> None:
    import dask.array as da

    x, y, x_test, y_test = data
    model = ProjectedInfluence(TokenNet(), MarginTask(), 16, regularization=LAMBDA)
    model.fit(_loader(x, y))

    def dask_dict(values: Dict[str, torch.Tensor], chunk: int) -> Dict[str, Any]:
        return {
            k: da.from_array(v.numpy(), chunks=(chunk,) + v.shape[1:]) for k, v in values.items()
        }

    dx, dy = dask_dict(x, 7), da.from_array(y.numpy(), chunks=7)
    dx_test, dy_test = dask_dict(x_test, 3), da.from_array(y_test.numpy(), chunks=3)
    with DaskInfluenceCalculator(model, TorchNumpyConverter(), dask_client) as calculator:
        for mode in (UP, PERTURBATION):
            expected = model.influences(x_test, y_test, x, y, mode=mode).numpy()
            values = calculator.influences(dx_test, dy_test, dx, dy, mode=mode).compute()
            np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-12)
    store = GradientStore.write_dask(model, dx, dy, tmp_path / "d.zarr", dask_client)
    expected = model.influences(x_test, y_test, x, y)
    assert torch.allclose(store.influences(x_test, y_test), expected, rtol=1e-10, atol=1e-12)
