"""Structured batches (dicts, tuples, Mappings of tensors) and tasks.

A model taking a dict of a float and an integer tensor must give the influences of the same
model taking one concatenated float tensor, for every influence model, in both modes, through
every entry point; a task's measurement replaces the loss on the test side only.
"""

from __future__ import annotations

from collections import UserDict
from typing import Any, Callable, Dict, Tuple

import numpy as np
import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import influx.torch as it
import torch
from influx.calculator import SequentialInfluenceCalculator
from influx.torch import SupervisedTask, Task
from influx.torch.data.array_converters import NestedTorchCatAggregator, TorchCatAggregator
from influx.torch.util import TorchNumpyConverter
from influx.types import InfluenceMode

N_FEATURES, N_CATEGORIES, N_TRAIN, N_TEST = 3, 4, 24, 5
UP, PERTURBATION = InfluenceMode.Up, InfluenceMode.Perturbation


class _Body(torch.nn.Module):
    """Features and a categorical id, embedded (frozen), through a small MLP."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embedding = torch.nn.Embedding(N_CATEGORIES, 2)
        self.hidden = torch.nn.Linear(N_FEATURES + 2, 4)
        self.out = torch.nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        self.embedding.weight.requires_grad_(False)

    def body(self, features: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        h = torch.cat([features, self.embedding(category)], dim=-1)
        return self.out(torch.tanh(self.hidden(h)))


class DictNet(_Body):
    def forward(self, features: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return self.body(features, category)


class ConcatNet(_Body):
    """The same model on `cat([features, category as float])`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[:, :N_FEATURES], x[:, N_FEATURES].detach().long())


def _data(n: int, seed: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, N_FEATURES, generator=gen)
    category = torch.randint(0, N_CATEGORIES, (n,), generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return {"features": features, "category": category}, y


def _concat(x: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([x["features"], x["category"][:, None].double()], dim=1)


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, x: Dict[str, torch.Tensor], y: torch.Tensor, mapping: bool = False):
        self.x, self.y, self.mapping = x, y, mapping

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        x = {k: v[i] for k, v in self.x.items()}
        return {**x, "labels": self.y[i]} if self.mapping else (x, self.y[i])


def _dict_loader(x: Dict[str, torch.Tensor], y: torch.Tensor, mapping: bool = False) -> DataLoader:
    return DataLoader(_DictDataset(x, y, mapping), batch_size=8)


def _concat_loader(x: Dict[str, torch.Tensor], y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(_concat(x), y), batch_size=8)


LOSS = F.cross_entropy

MODELS: Dict[str, Callable[[torch.nn.Module, Any], Any]] = {
    "direct": lambda m, loss: it.DirectInfluence(m, loss, regularization=0.1),
    "cg": lambda m, loss: it.CgInfluence(m, loss, regularization=0.1, rtol=1e-12, atol=1e-14),
    "lissa": lambda m, loss: it.LissaInfluence(
        m, loss, regularization=0.1, maxiter=30, scale=20.0, warn_on_max_iteration=False
    ),
    "arnoldi": lambda m, loss: it.ArnoldiInfluence(m, loss, regularization=0.1, rank=6),
    "nystroem": lambda m, loss: it.NystroemSketchInfluence(
        m, loss, regularization=0.1, rank=6, seed=3
    ),
    "ihm": lambda m, loss: it.InverseHarmonicMeanInfluence(m, loss, regularization=0.1),
    "ekfac": lambda m, loss: it.EkfacInfluence(m, True, loss=loss, regularization=0.1),
    "projected": lambda m, loss: it.ProjectedInfluence(m, loss, 12, regularization=0.1, seed=1),
}


@pytest.fixture(scope="module")
def data() -> Tuple[Any, ...]:
    x, y = _data(N_TRAIN, 1)
    x_test, y_test = _data(N_TEST, 2)
    return x, y, x_test, y_test


def _fitted_pair(name: str, data: Tuple[Any, ...], loss: Any = LOSS) -> Tuple[Any, Any]:
    x, y, _, _ = data
    torch.manual_seed(0)  # the same random start for the randomised methods
    structured = MODELS[name](DictNet(), loss).fit(_dict_loader(x, y))
    torch.manual_seed(0)
    flat = MODELS[name](ConcatNet(), LOSS).fit(_concat_loader(x, y))
    return structured, flat


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(MODELS))
def test_dict_inputs_equal_concatenated_inputs(name: str, data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data
    structured, flat = _fitted_pair(name, data)
    cx, cx_test = _concat(x), _concat(x_test)
    _close(structured.influence_factors(x_test, y_test), flat.influence_factors(cx_test, y_test))
    up = flat.influences(cx_test, y_test, cx, y)
    _close(structured.influences(x_test, y_test, x, y), up)
    factors = structured.influence_factors(x_test, y_test)
    _close(structured.influences_from_factors(factors, x, y), up)
    _close(structured.self_influences(x, y), flat.self_influences(cx, y))
    # Perturbation on the float entry: the first N_FEATURES columns of the concatenated input.
    perturbation = flat.influences(cx_test, y_test, cx, y, mode=PERTURBATION)[..., :N_FEATURES]
    assert structured.perturbation_shape(x) == (N_FEATURES,)
    _close(structured.influences(x_test, y_test, x, y, mode=PERTURBATION), perturbation)
    _close(structured.influences_from_factors(factors, x, y, mode=PERTURBATION), perturbation)
    _close(
        structured.self_influences(x, y, mode=PERTURBATION),
        flat.self_influences(cx, y, mode=PERTURBATION)[..., :N_FEATURES],
    )


def test_sequential_calculator_with_dict_inputs(data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data
    structured, flat = _fitted_pair("direct", data)
    calc = SequentialInfluenceCalculator(structured)
    for mode, keep in ((UP, slice(None)), (PERTURBATION, slice(0, N_FEATURES))):
        reference = flat.influences(_concat(x_test), y_test, _concat(x), y, mode=mode)
        values = calc.influences(
            _dict_loader(x_test, y_test), _dict_loader(x, y, mapping=True), mode=mode
        ).compute(aggregator=NestedTorchCatAggregator())
        _close(values, reference[..., keep])
    self_values = calc.self_influences(_dict_loader(x, y)).compute(aggregator=TorchCatAggregator())
    _close(self_values, flat.self_influences(_concat(x), y))


def test_dask_calculator_with_dict_inputs(dask_client: Any, data: Tuple[Any, ...]) -> None:
    import dask.array as da

    from influx.calculator import DaskInfluenceCalculator

    x, y, x_test, y_test = data
    structured, flat = _fitted_pair("direct", data)
    calc = DaskInfluenceCalculator(structured, TorchNumpyConverter(), dask_client)

    def dask_dict(values: Dict[str, torch.Tensor], chunk: int) -> Dict[str, Any]:
        return {
            k: da.from_array(v.numpy(), chunks=(chunk,) + v.shape[1:]) for k, v in values.items()
        }

    dx, dy = dask_dict(x, 10), da.from_array(y.numpy(), chunks=10)
    dx_test, dy_test = dask_dict(x_test, 3), da.from_array(y_test.numpy(), chunks=3)
    for mode, keep in ((UP, slice(None)), (PERTURBATION, slice(0, N_FEATURES))):
        reference = flat.influences(_concat(x_test), y_test, _concat(x), y, mode=mode)[..., keep]
        values = calc.influences(dx_test, dy_test, dx, dy, mode=mode)
        assert values.shape == tuple(reference.shape)
        np.testing.assert_allclose(values.compute(), reference.numpy(), rtol=1e-10, atol=1e-12)
        factors = calc.influence_factors(dx_test, dy_test)
        from_factors = calc.influences_from_factors(factors, dx, dy, mode=mode)
        np.testing.assert_allclose(
            from_factors.compute(), reference.numpy(), rtol=1e-10, atol=1e-12
        )
    self_values = calc.self_influences(dx, dy, mode=PERTURBATION).compute()
    reference = flat.self_influences(_concat(x), y, mode=PERTURBATION)[..., :N_FEATURES]
    np.testing.assert_allclose(self_values, reference.numpy(), rtol=1e-10, atol=1e-12)


def test_dask_calculator_rejects_unaligned_dict_chunks(
    dask_client: Any, data: Tuple[Any, ...]
) -> None:
    import dask.array as da

    from influx.calculator import DaskInfluenceCalculator, UnalignedChunksError

    x, y, _, _ = data
    structured, _ = _fitted_pair("direct", data)
    calc = DaskInfluenceCalculator(structured, TorchNumpyConverter(), dask_client)
    dx = {
        "features": da.from_array(x["features"].numpy(), chunks=(10, -1)),
        "category": da.from_array(x["category"].numpy(), chunks=8),
    }
    with pytest.raises(UnalignedChunksError, match=r"x\['features'\].*x\['category'\]"):
        calc.influence_factors(dx, da.from_array(y.numpy(), chunks=10))


def test_mapping_batches_equal_pairs(data: Tuple[Any, ...]) -> None:
    """A loader of HF-collator style mappings ("labels" is y) fits and computes as pairs."""
    x, y, x_test, y_test = data
    from_pairs = it.CgInfluence(DictNet(), LOSS, regularization=0.1, rtol=1e-12).fit(
        _dict_loader(x, y)
    )
    from_mappings = it.CgInfluence(DictNet(), LOSS, regularization=0.1, rtol=1e-12).fit(
        _dict_loader(x, y, mapping=True)
    )
    _close(
        from_pairs.influences(x_test, y_test, x, y), from_mappings.influences(x_test, y_test, x, y)
    )
    # A Mapping that is not a dict (like a tokenizer's BatchEncoding) is accepted as x.
    _close(
        from_pairs.influence_factors(UserDict(x_test), y_test),
        from_pairs.influence_factors(x_test, y_test),
    )


def test_tuple_inputs_are_positional(data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data
    model = it.DirectInfluence(DictNet(), LOSS, regularization=0.1).fit(_dict_loader(x, y))
    as_tuple = (x_test["features"], x_test["category"])
    _close(model.influence_factors(as_tuple, y_test), model.influence_factors(x_test, y_test))


class ScaledMeasurement(SupervisedTask):
    def __init__(self, scale: float):
        super().__init__(F.cross_entropy)
        self.scale = scale

    def measurement(self, model: Any, x: Any, y: Any) -> torch.Tensor:
        return self.scale * self.loss(model, x, y)


class KeywordTask(Task):
    """A task calling the model itself."""

    def loss(self, model: Any, x: Any, y: Any) -> torch.Tensor:
        return F.cross_entropy(model(features=x["features"], category=x["category"]), y)


@pytest.mark.parametrize("name", ["direct", "cg", "ekfac", "projected"])
def test_task_with_loss_measurement_equals_no_task(name: str, data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data
    plain, _ = _fitted_pair(name, data)
    for task in (KeywordTask(), SupervisedTask(F.cross_entropy)):
        with_task, _ = _fitted_pair(name, data, loss=task)
        _close(with_task.influences(x_test, y_test, x, y), plain.influences(x_test, y_test, x, y))
        _close(
            with_task.influences(x_test, y_test, x, y, mode=PERTURBATION),
            plain.influences(x_test, y_test, x, y, mode=PERTURBATION),
        )


def test_measurement_scales_test_factors(data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data
    plain, _ = _fitted_pair("direct", data)
    scaled, _ = _fitted_pair("direct", data, loss=ScaledMeasurement(2.5))
    _close(scaled.influence_factors(x_test, y_test), 2.5 * plain.influence_factors(x_test, y_test))
    _close(scaled.influences(x_test, y_test, x, y), 2.5 * plain.influences(x_test, y_test, x, y))
    # The training side (self-influences) keeps the loss.
    _close(scaled.self_influences(x, y), plain.self_influences(x, y))


class IdsOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 3)
        self.embedding.weight.requires_grad_(False)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = (self.embedding(input_ids) * attention_mask[..., None]).sum(1)
        return self.out(h)


def test_perturbation_on_integer_inputs_is_a_clear_error() -> None:
    gen = torch.Generator().manual_seed(0)
    x = {
        "input_ids": torch.randint(0, 10, (6, 4), generator=gen),
        "attention_mask": torch.ones(6, 4, dtype=torch.long),
    }
    y = torch.randint(0, 2, (6,), generator=gen)
    model = it.DirectInfluence(IdsOnly(), LOSS, regularization=0.1).fit(_dict_loader(x, y))
    assert model.influences(x, y, x, y).shape == (6, 6)
    with pytest.raises(
        ValueError, match=r"no floating-point tensor.*torch.int64.*perturbation_input"
    ):
        model.influences(x, y, x, y, mode=PERTURBATION)
    ids = x["input_ids"]

    class OnIds(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = IdsOnly()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids, torch.ones_like(input_ids))

    single = it.DirectInfluence(OnIds(), LOSS, regularization=0.1).fit([(ids, y)])
    with pytest.raises(ValueError, match=r"dtype torch.int64.*perturbation_input"):
        single.self_influences(ids, y, mode=PERTURBATION)


def test_perturbation_input_names_the_entry(data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data

    class Both(SupervisedTask):
        def perturbation_input(self, x: Any) -> str:
            return "features"

    class Missing(SupervisedTask):
        def perturbation_input(self, x: Any) -> str:
            return "pixels"

    plain, _ = _fitted_pair("direct", data)
    named, _ = _fitted_pair("direct", data, loss=Both(F.cross_entropy))
    _close(
        named.influences(x_test, y_test, x, y, mode=PERTURBATION),
        plain.influences(x_test, y_test, x, y, mode=PERTURBATION),
    )
    missing, _ = _fitted_pair("direct", data, loss=Missing(F.cross_entropy))
    with pytest.raises(ValueError, match=r"returned 'pixels', which is not an entry of x"):
        missing.influences(x_test, y_test, x, y, mode=PERTURBATION)


def test_structured_batch_errors() -> None:
    with pytest.raises(ValueError, match=r"share the first \(sample\) dimension.*x\['b'\]"):
        it.TorchBatch({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, torch.zeros(3))
    with pytest.raises(TypeError, match=r"dict, tuple or list of tensors; x\['b'\] is a str"):
        it.TorchBatch({"a": torch.zeros(3, 2), "b": "text"}, torch.zeros(3))
    with pytest.raises(
        TypeError, match=r"'data' must yield pairs \(x, y\) or mappings with a 'labels'"
    ):
        it.DirectInfluence(DictNet(), LOSS, regularization=0.1).fit(
            [{"features": torch.zeros(2, 3)}]
        )


def test_generalized_gauss_newton_needs_a_loss_function(data: Tuple[Any, ...]) -> None:
    from influx.torch.curvature.generalized_gauss_newton import GeneralizedGaussNewtonBatchOperation

    with pytest.raises(TypeError, match="needs a function loss\\(outputs, y\\), got a task"):
        GeneralizedGaussNewtonBatchOperation(DictNet(), KeywordTask())


class Branching(torch.nn.Module):
    """Branches on the values of its input, which vmap cannot map."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.all():
            return self.linear(x)
        return self.linear(x * mask[..., None].to(x.dtype)).sum(1) / mask.sum(1, keepdim=True)


def test_model_that_vmap_cannot_map_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, generator=gen)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:3, 2:] = False
    y = torch.randint(0, 2, (6,), generator=gen)
    net = Branching()

    def reference(i: int) -> torch.Tensor:
        out = net(x[i : i + 1], mask[i : i + 1])
        out = out if out.ndim == 2 else out.mean(1)
        grads = torch.autograd.grad(LOSS(out, y[i : i + 1]), list(net.parameters()))
        return torch.cat([g.reshape(-1) for g in grads])

    class Mean(Task):
        def loss(self, model: Any, x: Any, y: Any) -> torch.Tensor:
            out = model(*x)
            return LOSS(out if out.ndim == 2 else out.mean(1), y)

    model = it.DirectInfluence(net, Mean(), regularization=0.1).fit([((x, mask), y)])
    provider = model.block_mapper.composable_block_dict["model"].gradient_provider
    with caplog.at_level("WARNING"):
        grads = provider.flat_grads(it.TorchBatch((x, mask), y))
        provider.flat_grads(it.TorchBatch((x, mask), y))
    assert sum("one sample at a time" in r.message for r in caplog.records) == 1  # a task
    _close(grads, torch.stack([reference(i) for i in range(6)]))
    # Influences through the fallback equal those from the reference gradients.
    values = model.influences((x, mask), y, (x, mask), y)
    assert values.shape == (6, 6) and bool(torch.isfinite(values).all())


def test_generalized_gauss_newton_and_kfac_with_dict_inputs(data: Tuple[Any, ...]) -> None:
    from influx.torch import (
        ComposedInfluence,
        DirectSolver,
        FactoredSolver,
        KroneckerCurvature,
        ModeCurvature,
        SecondOrderMode,
    )

    x, y, x_test, y_test = data
    cx, cx_test = _concat(x), _concat(x_test)
    parts = {
        "ggn": (ModeCurvature(SecondOrderMode.GENERALIZED_GAUSS_NEWTON), DirectSolver()),
        "kfac": (KroneckerCurvature(update_diagonal=False), FactoredSolver()),
    }
    for curvature, solver in parts.values():
        structured = ComposedInfluence(DictNet(), LOSS, curvature, solver, regularization=0.1)
        flat = ComposedInfluence(ConcatNet(), LOSS, curvature, solver, regularization=0.1)
        structured.fit(_dict_loader(x, y))
        flat.fit(_concat_loader(x, y))
        _close(structured.influences(x_test, y_test, x, y), flat.influences(cx_test, y_test, cx, y))


def test_top_k_with_dict_inputs(data: Tuple[Any, ...]) -> None:
    x, y, x_test, y_test = data
    structured, flat = _fitted_pair("direct", data)
    top = it.top_k_influences(structured, x_test, y_test, _dict_loader(x, y, mapping=True), k=3)
    reference = it.top_k_influences(flat, _concat(x_test), y_test, _concat_loader(x, y), k=3)
    torch.testing.assert_close(top.helpful_indices, reference.helpful_indices)
    _close(top.harmful_values, reference.harmful_values)


class MaskedMean(torch.nn.Module):
    """Mean over the unmasked positions, with a shortcut when nothing is masked."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.all():
            return self.linear(x.mean(1))
        weights = mask[..., None].to(x.dtype)
        return self.linear((x * weights).sum(1) / weights.sum(1))


def test_chunked_fallback_for_a_loss_function(caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(21, 4, 3, generator=gen)
    mask = torch.ones(21, 4, dtype=torch.bool)
    mask[::2, 3:] = False
    y = torch.randint(0, 3, (21,), generator=gen)
    net = MaskedMean()

    def reference(loss: Callable[..., torch.Tensor]) -> torch.Tensor:
        rows = []
        for i in range(21):
            value = loss(net(x[i : i + 1], mask[i : i + 1]), y[i : i + 1])
            rows.append(
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(value, list(net.parameters()))]
                )
            )
        return torch.stack(rows)

    weight = torch.tensor([1.0, 2.0, 3.0])

    def weighted(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target, weight=weight)  # not a mean of per-sample terms

    for loss, how in (
        (F.cross_entropy, "one forward pass per chunk"),
        (weighted, "one sample at a time"),
    ):
        caplog.clear()
        provider = it.TorchGradientProvider(net, loss)
        with caplog.at_level("WARNING"):
            grads = provider.flat_grads(it.TorchBatch((x, mask), y))
            again = provider.flat_grads(it.TorchBatch((x, mask), y))
        assert [how in r.message for r in caplog.records] == [True]
        _close(grads, reference(loss))
        _close(again, grads)
