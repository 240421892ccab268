"""Per-token influences through the Sequential and Dask calculators: the values of
`influences(..., per_token=...)`, in memory and in real zarr stores with a token axis."""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Tuple

import cloudpickle
import dask.array as da
import numpy as np
import pytest
import zarr
from distributed import Client

import torch
from helpers import lm_corpus, tiny_gpt2
from influx import DaskInfluenceCalculator, SequentialInfluenceCalculator
from influx.array import dask_array_to_zarr
from influx.torch import (
    CausalLMTask,
    DirectInfluence,
    EkfacInfluence,
    NestedTorchCatAggregator,
    TorchNumpyConverter,
)
from influx.torch.kfac.layers import is_conv1d

pytest.importorskip("transformers")
cloudpickle.register_pickle_by_value(sys.modules[__name__])

Batch = Tuple[Dict[str, torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def ekfac() -> EkfacInfluence:
    net = tiny_gpt2()
    layers = [name for name, module in net.named_modules() if is_conv1d(module)]
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in layers))
    model = EkfacInfluence(net, True, loss=CausalLMTask(), regularization=0.1, layers=layers)
    return model.fit([lm_corpus(10, 0)])


def batches(x: Dict[str, torch.Tensor], y: torch.Tensor, size: int) -> List[Batch]:
    return [
        ({k: v[i : i + size] for k, v in x.items()}, y[i : i + size])
        for i in range(0, len(y), size)
    ]


@pytest.mark.parametrize("per_token", ["test", "train"])
def test_sequential_per_token_equals_the_model(
    ekfac: EkfacInfluence, per_token: str, tmp_path: Any
) -> None:
    x, y = lm_corpus(7, 1)
    x_test, y_test = lm_corpus(5, 2)
    expected = ekfac.influences(x_test, y_test, x, y, per_token=per_token)
    calculator = SequentialInfluenceCalculator(ekfac)
    lazy = calculator.influences(batches(x_test, y_test, 2), batches(x, y, 3), per_token=per_token)
    values = lazy.compute(aggregator=NestedTorchCatAggregator())
    assert values.shape == expected.shape
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-12)
    stored = lazy.to_zarr(tmp_path / "scores.zarr", TorchNumpyConverter(), return_stored=True)
    np.testing.assert_allclose(stored[:], expected.numpy(), rtol=1e-10, atol=1e-12)
    attributes = zarr.open_array(tmp_path / "scores.zarr", mode="r").attrs["influx"]
    token_axis = 1 if per_token == "test" else 2
    assert attributes["per_token"] == per_token and attributes["token_axis"] == token_axis
    assert stored.chunks[token_axis] == 6  # the token axis whole in every zarr chunk
    resumed = lazy.to_zarr(tmp_path / "scores.zarr", TorchNumpyConverter(), resume=True)
    assert resumed is None


@pytest.mark.parametrize("per_token", ["test", "train"])
def test_sequences_of_different_lengths_need_max_length(
    ekfac: EkfacInfluence, per_token: str, tmp_path: Any
) -> None:
    """Batches of 6 and of 5 tokens: an error naming max_length, or padded to it."""
    x, y = lm_corpus(4, 3)
    x_test, y_test = lm_corpus(4, 4)
    short = ({k: v[2:, :5] for k, v in x.items()}, y[2:, :5])
    short_test = ({k: v[2:, :5] for k, v in x_test.items()}, y_test[2:, :5])
    test = [({k: v[:2] for k, v in x_test.items()}, y_test[:2]), short_test]
    train = [({k: v[:2] for k, v in x.items()}, y[:2]), short]
    calculator = SequentialInfluenceCalculator(ekfac)
    lazy = calculator.influences(test, train, per_token=per_token)
    with pytest.raises(ValueError, match="Parameter 'max_length' is needed"):
        lazy.compute(aggregator=NestedTorchCatAggregator())
    with pytest.raises(ValueError, match="pass max_length"):
        lazy.to_zarr(tmp_path / "unpadded.zarr", TorchNumpyConverter())
    padded = calculator.influences(test, train, per_token=per_token, max_length=7)
    values = padded.compute(aggregator=NestedTorchCatAggregator())
    token_axis = 1 if per_token == "test" else 2
    assert values.shape[token_axis] == 7
    # the last short batch of its side, through the model, and zeros after its 5 tokens
    if per_token == "test":
        expected = ekfac.influences(*short_test, *train[0], per_token="test")
        torch.testing.assert_close(values[2:, :5, :2], expected, rtol=1e-10, atol=1e-12)
        assert bool((values[2:, 5:] == 0).all())
    else:
        expected = ekfac.influences(*test[0], *short, per_token="train")
        torch.testing.assert_close(values[:2, 2:, :5], expected, rtol=1e-10, atol=1e-12)
        assert bool((values[:, 2:, 5:] == 0).all())
    with pytest.raises(ValueError, match=r"Parameter 'max_length' \(4\) is shorter"):
        calculator.influences(test, train, per_token=per_token, max_length=4).compute()


def test_per_token_arguments_are_checked(ekfac: EkfacInfluence) -> None:
    calculator = SequentialInfluenceCalculator(ekfac)
    data = batches(*lm_corpus(2, 0), 2)
    with pytest.raises(ValueError, match="Parameter 'max_length' pads the token axis"):
        calculator.influences(data, data, max_length=6)
    with pytest.raises(ValueError, match="Parameter 'max_length' must be a positive int"):
        calculator.influences(data, data, per_token="test", max_length=0)
    with pytest.raises(ValueError, match="Parameter 'per_token' must be None, 'test' or"):
        calculator.influences(data, data, per_token="both")
    plain = torch.nn.Linear(3, 2).double()
    direct = DirectInfluence(plain, torch.nn.functional.cross_entropy, regularization=0.1)
    inputs, targets = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    direct.fit([(inputs, targets)])
    with pytest.raises(TypeError, match="Parameter 'per_token' needs a task with per-token"):
        SequentialInfluenceCalculator(direct).influences(
            [(inputs, targets)], [(inputs, targets)], per_token="train"
        )


class MeasurementOnlyTask(CausalLMTask):
    """A task with per-token measurements but no per-token training loss terms."""

    token_loss_terms = None  # type: ignore[assignment]


def test_a_side_the_task_does_not_support_is_refused() -> None:
    net = tiny_gpt2()
    model = DirectInfluence(net, MeasurementOnlyTask(), regularization=0.1)
    with pytest.raises(TypeError, match="token_loss_terms for per_token='train'"):
        model.check_per_token("train")
    model.check_per_token("test")


class TinyLM(torch.nn.Module):
    """Embeddings, a Linear layer, a causal running mean over positions, logits: a sequence
    model the Dask workers unpickle without transformers."""

    def __init__(self, vocab: int = 11, d: int = 6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.hidden = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.embed(input_ids)))
        counts = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.out(h.cumsum(1) / counts)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tiny_lm() -> EkfacInfluence:
    torch.manual_seed(0)
    net = TinyLM().double()
    net.embed.weight.requires_grad_(False)
    model = EkfacInfluence(net, True, loss=CausalLMTask(), regularization=0.1)
    return model.fit([lm_corpus(10, 0)])


def dask_pair(x: Dict[str, torch.Tensor], y: torch.Tensor, chunk: int) -> Tuple[Any, Any]:
    arrays = {k: da.from_array(v.numpy(), chunks=(chunk, -1)) for k, v in x.items()}
    return arrays, da.from_array(y.numpy(), chunks=(chunk, -1))


@pytest.mark.parametrize("per_token", ["test", "train"])
def test_dask_per_token_equals_the_model(
    tiny_lm: EkfacInfluence, dask_client: Client, per_token: str, tmp_path: Any
) -> None:
    x, y = lm_corpus(7, 1)
    x_test, y_test = lm_corpus(5, 2)
    expected = tiny_lm.influences(x_test, y_test, x, y, per_token=per_token).numpy()
    assert np.abs(expected).max() > 0
    with DaskInfluenceCalculator(tiny_lm, TorchNumpyConverter(), dask_client) as calculator:
        values = calculator.influences(
            *dask_pair(x_test, y_test, 2), *dask_pair(x, y, 3), per_token=per_token
        )
        assert values.shape == expected.shape
        token_axis = 1 if per_token == "test" else 2
        assert len(values.chunks[token_axis]) == 1
        assert values.zarr_metadata["token_axis"] == token_axis
        np.testing.assert_allclose(values.compute(), expected, rtol=1e-10, atol=1e-12)
        stored = dask_array_to_zarr(values, tmp_path / "scores.zarr", return_stored=True)
        np.testing.assert_allclose(stored[:], expected, rtol=1e-10, atol=1e-12)
        assert stored.attrs["influx"]["complete"]
        padded = calculator.influences(
            *dask_pair(x_test, y_test, 2), *dask_pair(x, y, 3), per_token=per_token, max_length=8
        ).compute()
        assert padded.shape[token_axis] == 8
        np.testing.assert_allclose(
            padded.take(range(6), axis=token_axis), expected, rtol=1e-10, atol=1e-12
        )
