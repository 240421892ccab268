"""The sequential calculator, lazy chunk sequences, aggregators and resumable zarr output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader, TensorDataset

import influx.array as influx_array
import influx.array.zarr_writer as zarr_writer
import influx.torch
import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx import InfluenceMode, SequentialInfluenceCalculator, UnsupportedInfluenceModeException
from influx.array import (
    LazyChunk,
    LazyChunkSequence,
    ListAggregator,
    NestedLazyChunkSequence,
    NestedListAggregator,
    zarr_write_status,
)
from influx.torch import (
    DirectInfluence,
    NestedTorchCatAggregator,
    TorchCatAggregator,
    TorchNumpyConverter,
)

LOSS = torch.nn.functional.cross_entropy
MODES = [InfluenceMode.Up, InfluenceMode.Perturbation]


def _setup(
    dtype: torch.dtype = torch.float64, n_train: int = 37, n_test: int = 13
) -> Tuple[DirectInfluence, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    net = make_mlp().to(dtype)
    x, y = classification_data(n_train)
    x_test, y_test = classification_data(n_test, seed=3)
    x, x_test = x.to(dtype), x_test.to(dtype)
    model = DirectInfluence(net, LOSS, regularization=0.01).fit(loader(x, y))
    return model, x, y, x_test, y_test


@pytest.fixture(scope="module")
def direct64() -> Tuple[DirectInfluence, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return _setup(torch.float64)


class CountingModel:
    """Delegates to an influence model, counting calls; raises KeyboardInterrupt on request."""

    def __init__(self, model: Any, interrupt_after: int | None = None):
        self.model = model
        self.interrupt_after = interrupt_after
        self.factor_calls = 0
        self.influence_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def influence_factors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.factor_calls += 1
        return self.model.influence_factors(x, y)

    def influences_from_factors(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.interrupt_after is not None and self.influence_calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.influence_calls += 1
        return self.model.influences_from_factors(*args, **kwargs)


def _counting_calculator(model: Any, interrupt_after: int | None = None) -> Any:
    counting = CountingModel(model, interrupt_after)
    calc = SequentialInfluenceCalculator(model)
    calc.influence_function_model = counting  # type: ignore[assignment]
    return calc, counting


# ------------------------------------------------------------------------------ correctness


@pytest.mark.parametrize("mode", MODES)
def test_sequential_compute_and_zarr_equal_in_memory_float64(
    direct64: Any, mode: InfluenceMode, tmp_path: Path
) -> None:
    model, x, y, x_test, y_test = direct64
    reference = model.influences(x_test, y_test, x, y, mode=mode)
    calc = SequentialInfluenceCalculator(model)
    lazy = calc.influences(loader(x_test, y_test, 5), loader(x, y, 10), mode=mode)
    values = lazy.compute(aggregator=NestedTorchCatAggregator())
    assert values.shape == reference.shape
    assert torch.allclose(values, reference, rtol=1e-10, atol=1e-12)

    stored = lazy.to_zarr(tmp_path / "m.zarr", TorchNumpyConverter(), return_stored=True)
    assert stored is not None
    np.testing.assert_allclose(stored[...], reference.numpy(), rtol=1e-10, atol=1e-12)
    reread = zarr.open_array(tmp_path / "m.zarr", mode="r")
    assert reread.shape == tuple(reference.shape)
    assert reread.chunks[:2] == (5, 10)
    info = reread.attrs["influx"]
    assert info["mode"] == mode.value and info["quantity"] == "influences"
    assert info["chunk_lengths"] == [[5, 5, 3], [10, 10, 10, 7]]
    assert info["complete"] is True


@pytest.mark.parametrize("mode", MODES)
def test_sequential_float32_within_1e6(mode: InfluenceMode, tmp_path: Path) -> None:
    model, x, y, x_test, y_test = _setup(torch.float32)
    reference = model.influences(x_test, y_test, x, y, mode=mode)
    lazy = SequentialInfluenceCalculator(model).influences(
        loader(x_test, y_test, 4), loader(x, y, 9), mode=mode
    )
    values = lazy.compute(aggregator=NestedTorchCatAggregator())
    assert values.dtype == torch.float32
    assert rel_err(values, reference) < 1e-6
    stored = lazy.to_zarr(tmp_path / "m32.zarr", TorchNumpyConverter(), return_stored=True)
    assert stored is not None and stored.dtype == np.float32
    assert rel_err(torch.from_numpy(stored[...]), reference) < 1e-6


def test_factors_and_influences_from_factors(direct64: Any, tmp_path: Path) -> None:
    model, x, y, x_test, y_test = direct64
    calc = SequentialInfluenceCalculator(model)
    lazy_factors = calc.influence_factors(loader(x_test, y_test, 4))
    factors = lazy_factors.compute(aggregator=TorchCatAggregator())
    assert torch.allclose(factors, model.influence_factors(x_test, y_test), rtol=1e-10)
    chunks = lazy_factors.compute()
    assert [len(c) for c in chunks] == [4, 4, 4, 1]
    stored = lazy_factors.to_zarr(tmp_path / "f.zarr", TorchNumpyConverter(), return_stored=True)
    assert stored is not None and stored.shape == (13, model.n_parameters)
    assert stored.attrs["influx"]["quantity"] == "influence_factors"
    np.testing.assert_allclose(stored[...], factors.numpy(), rtol=1e-12)

    for mode in MODES:
        reference = model.influences(x_test, y_test, x, y, mode=mode)
        lazy = calc.influences_from_factors(chunks, loader(x, y, 10), mode=mode)
        values = lazy.compute(aggregator=NestedTorchCatAggregator())
        assert torch.allclose(values, reference, rtol=1e-10, atol=1e-12)
        nested = lazy.compute()
        assert [len(row) for row in nested] == [4, 4, 4, 4]


def test_factors_from_a_data_loader_of_a_single_tensor(direct64: Any) -> None:
    """A DataLoader over TensorDataset(factors) yields one-element lists: accepted as pyDVL
    accepts them."""
    model, x, y, x_test, y_test = direct64
    calc = SequentialInfluenceCalculator(model)
    factors = model.influence_factors(x_test, y_test)
    factor_loader = DataLoader(TensorDataset(factors), batch_size=5)
    assert isinstance(next(iter(factor_loader)), list)
    for mode in MODES:
        values = calc.influences_from_factors(factor_loader, loader(x, y, 10), mode=mode)
        np.testing.assert_allclose(
            values.compute(aggregator=NestedTorchCatAggregator()).numpy(),
            model.influences(x_test, y_test, x, y, mode=mode).numpy(),
            rtol=1e-10,
            atol=1e-12,
        )
    pairs = [(factors[:5], factors[:5])]
    with pytest.raises(
        ValueError, match="'z_test_factors' must yield factor chunks .* got a tuple of 2"
    ):
        calc.influences_from_factors(pairs, loader(x, y, 10)).compute()


def test_nothing_computed_until_asked_and_factors_once_per_test_chunk(direct64: Any) -> None:
    model, x, y, x_test, y_test = direct64
    calc, counting = _counting_calculator(model)
    lazy = calc.influences(loader(x_test, y_test, 5), loader(x, y, 10))
    assert counting.factor_calls == 0 and counting.influence_calls == 0
    lazy.compute(aggregator=NestedListAggregator())
    # 3 test chunks x 4 train chunks: one solve per test chunk, not per pair.
    assert counting.factor_calls == 3
    assert counting.influence_calls == 12


@pytest.mark.parametrize("mode", MODES)
def test_sequential_with_iterative_method(tmp_path: Path, mode: InfluenceMode) -> None:
    net = make_mlp()
    x, y = classification_data(37)
    x_test, y_test = classification_data(13, seed=3)
    cg_cls = influx.torch.CgInfluence
    model = cg_cls(net, LOSS, regularization=0.1, rtol=1e-10, atol=1e-12).fit(loader(x, y))
    reference = model.influences(x_test, y_test, x, y, mode=mode)
    lazy = SequentialInfluenceCalculator(model).influences(
        loader(x_test, y_test, 5), loader(x, y, 10), mode=mode
    )
    values = lazy.compute(aggregator=NestedTorchCatAggregator())
    assert rel_err(values, reference) < 1e-6
    stored = lazy.to_zarr(tmp_path / "cg.zarr", TorchNumpyConverter(), return_stored=True)
    assert stored is not None
    assert rel_err(torch.from_numpy(stored[...]), reference) < 1e-6


# --------------------------------------------------------------------------- interruption


def test_interrupted_to_zarr_resumes_with_only_missing_chunks(
    direct64: Any, tmp_path: Path
) -> None:
    model, x, y, x_test, y_test = direct64
    path = tmp_path / "resume.zarr"
    reference = model.influences(x_test, y_test, x, y)
    test_loader, train_loader = loader(x_test, y_test, 5), loader(x, y, 10)

    calc, counting = _counting_calculator(model, interrupt_after=6)
    with pytest.raises(KeyboardInterrupt):
        calc.influences(test_loader, train_loader).to_zarr(path, TorchNumpyConverter())
    assert counting.influence_calls == 6
    status = zarr_write_status(path)
    assert not status.complete
    assert status.n_chunks == 12 and status.n_completed_chunks == 6
    assert status.missing_chunks == [(1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]

    with pytest.raises(ValueError, match="An array exists at .*resume=True"):
        calc.influences(test_loader, train_loader).to_zarr(path, TorchNumpyConverter())

    calc, counting = _counting_calculator(model)
    stored = calc.influences(test_loader, train_loader).to_zarr(
        path, TorchNumpyConverter(), resume=True, return_stored=True
    )
    assert counting.influence_calls == 6  # only the missing chunks
    assert counting.factor_calls == 2  # test chunk 0 is complete: its factors are not needed
    assert stored is not None
    np.testing.assert_allclose(stored[...], reference.numpy(), rtol=1e-10, atol=1e-12)
    status = zarr_write_status(path)
    assert status.complete and not status.missing_chunks

    calc, counting = _counting_calculator(model)
    calc.influences(test_loader, train_loader).to_zarr(path, TorchNumpyConverter(), resume=True)
    assert counting.influence_calls == 0 and counting.factor_calls == 0


def test_chunk_written_without_marker_is_recomputed(
    direct64: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between a chunk's data and its marker leaves the chunk marked incomplete."""
    model, x, y, x_test, y_test = direct64
    path = tmp_path / "half.zarr"
    reference = model.influences(x_test, y_test, x, y)
    original = zarr_writer.write_marker
    calls = {"n": 0}

    def crash_on_fourth(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # data of chunk (0, 3) written, marker not
        original(*args)

    monkeypatch.setattr(zarr_writer, "write_marker", crash_on_fourth)
    lazy = SequentialInfluenceCalculator(model).influences(
        loader(x_test, y_test, 5), loader(x, y, 10)
    )
    with pytest.raises(KeyboardInterrupt):
        lazy.to_zarr(path, TorchNumpyConverter())
    monkeypatch.setattr(zarr_writer, "write_marker", original)
    assert zarr_write_status(path).missing_chunks[0] == (0, 3)

    # corrupt the unmarked chunk's data: resuming must rewrite it
    array = zarr.open_array(path, mode="r+")
    array[0:5, 30:37] = np.nan
    calc, counting = _counting_calculator(model)
    calc.influences(loader(x_test, y_test, 5), loader(x, y, 10)).to_zarr(
        path, TorchNumpyConverter(), resume=True
    )
    assert counting.influence_calls == 12 - 3
    np.testing.assert_allclose(
        zarr.open_array(path)[...], reference.numpy(), rtol=1e-10, atol=1e-12
    )


def test_resume_validates_the_stored_array(direct64: Any, tmp_path: Path) -> None:
    model, x, y, x_test, y_test = direct64
    path = tmp_path / "v.zarr"
    calc = SequentialInfluenceCalculator(model)
    calc.influences(loader(x_test, y_test, 5), loader(x, y, 10)).to_zarr(
        path, TorchNumpyConverter()
    )
    with pytest.raises(
        ValueError, match="holds mode='up', this computation has mode='perturbation'"
    ):
        calc.influences(
            loader(x_test, y_test, 5), loader(x, y, 10), mode=InfluenceMode.Perturbation
        ).to_zarr(path, TorchNumpyConverter(), resume=True)
    with pytest.raises(
        ValueError, match="chunk lengths .* \\(did the data or the chunk size change"
    ):
        calc.influences(loader(x_test, y_test, 5), loader(x, y, 8)).to_zarr(
            path, TorchNumpyConverter(), resume=True
        )
    with pytest.raises(ValueError, match="holds quantity='influences'"):
        calc.influence_factors(loader(x_test, y_test, 5)).to_zarr(
            path, TorchNumpyConverter(), resume=True
        )
    with pytest.raises(ValueError, match="'overwrite' and 'resume' are mutually exclusive"):
        calc.influence_factors(loader(x_test, y_test, 5)).to_zarr(
            path, TorchNumpyConverter(), resume=True, overwrite=True
        )
    zarr.open_array(tmp_path / "foreign.zarr", mode="w", shape=(2,), dtype="f8")
    with pytest.raises(ValueError, match="was not written by influx"):
        calc.influence_factors(loader(x_test, y_test, 5)).to_zarr(
            tmp_path / "foreign.zarr", TorchNumpyConverter(), resume=True
        )
    # overwrite replaces the array, markers included
    calc.influence_factors(loader(x_test, y_test, 5)).to_zarr(
        path, TorchNumpyConverter(), overwrite=True
    )
    status = zarr_write_status(path)
    assert status.metadata["quantity"] == "influence_factors" and status.n_completed_chunks == 3


def test_resume_without_existing_array_starts_a_new_one(direct64: Any, tmp_path: Path) -> None:
    model, x, y, x_test, y_test = direct64
    stored = (
        SequentialInfluenceCalculator(model)
        .influence_factors(loader(x_test, y_test, 5))
        .to_zarr(tmp_path / "new.zarr", TorchNumpyConverter(), resume=True, return_stored=True)
    )
    assert stored is not None
    np.testing.assert_allclose(stored[...], model.influence_factors(x_test, y_test).numpy())


# -------------------------------------------------------------- generic lazy sequences


def test_sequence_of_ready_tensors_grows_and_resumes(tmp_path: Path) -> None:
    """Sequences that yield tensors (no planned lengths) are grown as they are written."""
    blocks = [np.arange(6.0).reshape(3, 2) + 10 * k for k in range(3)] + [np.ones((1, 2))]
    produced: List[int] = []

    def factory() -> Iterator[torch.Tensor]:
        for k, block in enumerate(blocks):
            produced.append(k)
            yield torch.from_numpy(block)

    seq = LazyChunkSequence(factory, len_generator=4)
    stored = seq.to_zarr(tmp_path / "g.zarr", TorchNumpyConverter(), return_stored=True)
    assert stored is not None and stored.shape == (10, 2)
    np.testing.assert_array_equal(stored[...], np.concatenate(blocks))
    assert stored.attrs["influx"]["chunk_lengths"] == [[3, 3, 3, 1]]
    assert [len(c) for c in seq.compute(ListAggregator())] == [3, 3, 3, 1]

    nested = NestedLazyChunkSequence(
        lambda: ((torch.full((2, 3), float(i + j)) for j in range(2)) for i in range(3))
    )
    stored = nested.to_zarr(tmp_path / "n.zarr", TorchNumpyConverter(), return_stored=True)
    assert stored is not None and stored.shape == (6, 6)
    assert stored[5, 5] == 3.0
    again = nested.to_zarr(
        tmp_path / "n.zarr", TorchNumpyConverter(), resume=True, return_stored=True
    )
    assert again is not None and again.shape == (6, 6)


def test_lazy_chunk_is_computed_only_on_demand() -> None:
    calls: List[int] = []
    seq = LazyChunkSequence(
        lambda: (
            LazyChunk(lambda k=k: calls.append(k) or torch.ones(2, 1) * k, 2) for k in range(3)
        )
    )
    assert calls == []
    assert torch.equal(
        seq.compute(TorchCatAggregator()).flatten(), torch.tensor([0.0, 0, 1, 1, 2, 2])
    )
    assert calls == [0, 1, 2]


def test_empty_sequences_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="The sequence is empty"):
        LazyChunkSequence(lambda: iter([])).to_zarr(tmp_path / "e.zarr", TorchNumpyConverter())
    with pytest.raises(ValueError, match="The sequence is empty"):
        NestedLazyChunkSequence(lambda: iter([])).to_zarr(
            tmp_path / "e2.zarr", TorchNumpyConverter()
        )
    with pytest.raises(ValueError, match="The sequence is empty"):
        LazyChunkSequence(lambda: iter([])).compute(TorchCatAggregator())


def test_rows_with_different_columns_raise(tmp_path: Path) -> None:
    nested = NestedLazyChunkSequence(
        lambda: ((torch.ones(2, 3) for _ in range(i + 1)) for i in range(2))
    )
    with pytest.raises(ValueError, match="Row 1 of the nested sequence has 6 columns, row 0 has 3"):
        nested.to_zarr(tmp_path / "r.zarr", TorchNumpyConverter())


# --------------------------------------------------------------------------------- errors


def test_sequential_errors(direct64: Any) -> None:
    model, x, y, x_test, y_test = direct64
    calc = SequentialInfluenceCalculator(model)
    with pytest.raises(TypeError, match="'train_data_iterable' must be iterable more than once"):
        calc.influences(loader(x_test, y_test), iter(loader(x, y)))
    with pytest.raises(TypeError, match="'data_iterable' must be an iterable of"):
        calc.influence_factors(42)  # type: ignore[arg-type]
    with pytest.raises(
        UnsupportedInfluenceModeException, match="unsupported influence mode 'sideways'"
    ):
        calc.influences(loader(x_test, y_test), loader(x, y), mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must yield \\(x, y\\) pairs"):
        calc.influence_factors([x_test]).compute()
    unfitted = DirectInfluence(make_mlp(), LOSS, regularization=0.01)
    with pytest.raises(ValueError, match="DirectInfluence is not fitted"):
        SequentialInfluenceCalculator(unfitted)
    with pytest.raises(TypeError, match="must be an InfluenceFunctionModel, got int"):
        SequentialInfluenceCalculator(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- light imports


def test_import_influx_torch_does_not_import_dask_or_zarr() -> None:
    code = (
        "import sys, influx, influx.torch, influx.array, influx.calculator\n"
        "import influx.torch.util, influx.influence_calculator\n"
        "influx.SequentialInfluenceCalculator\n"
        "heavy = [m for m in ('dask', 'distributed', 'zarr') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_lists_of_batches_and_loaders_agree(direct64: Any, tmp_path: Path) -> None:
    """Chunk lengths come from the batch sampler of a DataLoader, or from the data itself."""
    model, x, y, x_test, y_test = direct64
    test_batches = [(x_test[i : i + 6], y_test[i : i + 6]) for i in range(0, 13, 6)]
    train_batches = [(x[i : i + 11], y[i : i + 11]) for i in range(0, 37, 11)]
    calc = SequentialInfluenceCalculator(model)
    stored = calc.influences(test_batches, train_batches).to_zarr(
        tmp_path / "l.zarr", TorchNumpyConverter(), return_stored=True
    )
    assert stored is not None
    assert stored.attrs["influx"]["chunk_lengths"] == [[6, 6, 1], [11, 11, 11, 4]]
    np.testing.assert_allclose(
        stored[...], model.influences(x_test, y_test, x, y).numpy(), rtol=1e-10, atol=1e-12
    )


def test_to_zarr_keeps_one_chunk_alive(tmp_path: Path) -> None:
    """Bounded memory: when a chunk is computed, no earlier chunk is still referenced (freed
    by reference counting alone, without waiting for the cycle collector)."""
    import weakref

    refs: List[Any] = []
    max_alive = {"n": 0}

    def make(i: int, j: int) -> torch.Tensor:
        max_alive["n"] = max(max_alive["n"], sum(r() is not None for r in refs))
        tensor = torch.full((4, 5), float(10 * i + j))
        refs.append(weakref.ref(tensor))
        return tensor

    def rows() -> Iterator[Any]:
        for i in range(6):
            yield influx_array.LazyChunkRow(
                lambda i=i: (LazyChunk(lambda i=i, j=j: make(i, j), 5) for j in range(7)), 4
            )

    nested = NestedLazyChunkSequence(rows)
    stored = nested.to_zarr(tmp_path / "mem.zarr", TorchNumpyConverter(), return_stored=True)
    assert stored is not None and stored.shape == (24, 35)
    assert stored[23, 34] == 56.0
    assert len(refs) == 42 and max_alive["n"] == 0
