"""Per-token influences: test-side and training-side splits that sum to the per-sequence
influences, for Direct, EK-FAC and the Kronecker projection on a tiny GPT-2."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest

import torch
from helpers import lm_corpus as corpus
from helpers import tiny_gpt2
from influx.torch import (
    CausalLMTask,
    DirectInfluence,
    EkfacInfluence,
    InfluenceMode,
    ProjectedInfluence,
    SecondOrderMode,
)
from influx.torch.kfac.layers import is_conv1d

pytest.importorskip("transformers")

T = 6


@pytest.fixture(scope="module")
def gpt2_models() -> Dict[str, Any]:
    net = tiny_gpt2()
    layers = [name for name, module in net.named_modules() if is_conv1d(module)]
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in layers))
    x, y = corpus(12, 0)
    task = CausalLMTask()
    direct = DirectInfluence(
        net, task, regularization=0.1, second_order_mode=SecondOrderMode.GAUSS_NEWTON
    )
    ekfac = EkfacInfluence(net, True, loss=task, regularization=0.1, layers=layers)
    projected = ProjectedInfluence(net, task, projection_dim=16, regularization=0.1)
    return {
        "direct": direct.fit([(x, y)]),
        "ekfac": ekfac.fit([(x, y)]),
        "projected": projected.fit([(x, y)]),
        "data": (x, y),
    }


@pytest.mark.parametrize("method", ["direct", "ekfac", "projected"])
def test_test_side_tokens_sum_to_the_sequences(gpt2_models: Dict[str, Any], method: str) -> None:
    model = gpt2_models[method]
    x, y = gpt2_models["data"]
    x_test, y_test = corpus(3, 1)
    per_sequence = model.influences(x_test, y_test, x, y)
    per_token = model.influences(x_test, y_test, x, y, per_token="test")
    assert per_token.shape == (3, T, 12)
    torch.testing.assert_close(per_token.sum(1), per_sequence, rtol=1e-10, atol=1e-10)
    # the prompt carries no measurement: its tokens have no influence
    prompt = x_test["completion_mask"] == 0
    assert bool((per_token[prompt] == 0).all())
    assert bool((per_token[~prompt].abs() > 0).all())


def test_a_test_token_equals_a_measurement_on_that_token(gpt2_models: Dict[str, Any]) -> None:
    """The workaround the test side replaces: a completion of one token, one pass per token."""
    model = gpt2_models["direct"]
    x, y = gpt2_models["data"]
    x_test, y_test = corpus(2, 1)
    per_token = model.influences(x_test, y_test, x, y, per_token="test")
    completion = x_test["completion_mask"]
    for k in (0, 1):  # the first, then the second completion token of every sequence
        positions = completion.argmax(1) + k
        one = {**x_test, "completion_mask": torch.zeros_like(completion)}
        one["completion_mask"][torch.arange(2), positions] = 1
        torch.testing.assert_close(
            model.influences(one, y_test, x, y),
            per_token[torch.arange(2), positions],
            rtol=1e-10,
            atol=1e-12,
        )


@pytest.mark.parametrize("method", ["direct", "ekfac", "projected"])
def test_training_side_tokens_sum_to_the_sequences(
    gpt2_models: Dict[str, Any], method: str
) -> None:
    model = gpt2_models[method]
    x, y = gpt2_models["data"]
    x_test, y_test = corpus(3, 1)
    per_sequence = model.influences(x_test, y_test, x, y)
    per_token = model.influences(x_test, y_test, x, y, per_token="train")
    assert per_token.shape == (3, 12, T)
    torch.testing.assert_close(per_token.sum(2), per_sequence, rtol=1e-10, atol=1e-10)


def test_training_side_of_a_kronecker_layer_is_its_positions() -> None:
    """Position s of a Kronecker layer contributes delta_s^T U a_s: checked with autograd on
    the module's own output, one training sequence at a time."""
    net = tiny_gpt2()
    layer = "transformer.h.0.mlp.c_fc"
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(name.startswith(layer))
    x, y = corpus(5, 2)
    task = CausalLMTask()
    model = EkfacInfluence(net, False, loss=task, regularization=0.1, layers=[layer])
    model.fit([(x, y)])
    x_test, y_test = corpus(2, 3)
    per_token = model.influences(x_test, y_test, x, y, per_token="train")
    u = model.influence_factors(x_test, y_test)  # (2, P): weight (d, m) flattened, then bias
    module = net.get_submodule(layer)
    d_in, m = module.weight.shape
    u_weight = u[:, : d_in * m].reshape(2, d_in, m)
    u_bias = u[:, d_in * m :]
    recorded: Dict[str, torch.Tensor] = {}

    def hook(_: Any, inputs: Tuple[torch.Tensor], output: torch.Tensor) -> None:
        output.retain_grad()
        recorded["a"], recorded["out"] = inputs[0], output

    handle = module.register_forward_hook(hook)
    try:
        for j in range(5):
            xj = {k: v[j : j + 1] for k, v in x.items()}
            task.loss(net, xj, y[j : j + 1]).backward()
            a, delta = recorded["a"][0].detach(), recorded["out"].grad[0]
            expected = torch.einsum("sd,idm,sm->is", a, u_weight, delta) + u_bias @ delta.T
            torch.testing.assert_close(per_token[:, j], expected, rtol=1e-10, atol=1e-12)
            net.zero_grad()
    finally:
        handle.remove()


def test_per_token_errors_name_the_parameter(gpt2_models: Dict[str, Any]) -> None:
    model = gpt2_models["direct"]
    x, y = gpt2_models["data"]
    with pytest.raises(ValueError, match="Parameter 'per_token' must be None, 'test' or 'train'"):
        model.influences(x, y, x, y, per_token="both")
    with pytest.raises(ValueError, match="Parameters 'x' and 'y' .* are required"):
        model.influences(x, y, per_token="test")
    with pytest.raises(ValueError, match="Parameter 'mode' must be InfluenceMode.Up"):
        model.influences(x, y, x, y, mode=InfluenceMode.Perturbation, per_token="test")
    plain = torch.nn.Linear(3, 2).double()
    direct = DirectInfluence(plain, torch.nn.functional.cross_entropy, regularization=0.1)
    inputs, targets = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    direct.fit([(inputs, targets)])
    with pytest.raises(TypeError, match="Parameter 'per_token' needs a task with per-token"):
        direct.influences(inputs, targets, inputs, targets, per_token="test")


def test_position_scores_in_chunks_equal_one_chunk(
    gpt2_models: Dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from influx.torch.composition import per_token

    model = gpt2_models["ekfac"]
    x, y = gpt2_models["data"]
    x_test, y_test = corpus(2, 1)
    whole = model.influences(x_test, y_test, x, y, per_token="train")
    monkeypatch.setattr(per_token, "CHUNK_ELEMENTS", 1)  # one training sequence at a time
    torch.testing.assert_close(
        model.influences(x_test, y_test, x, y, per_token="train"), whole, rtol=1e-12, atol=0
    )


class TinyGruLM(torch.nn.Module):
    """Embedding, GRU, linear head: logits `(N, T, V)` of `input_ids` (no vmap batching rule)."""

    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 4)
        self.rnn = torch.nn.GRU(4, 5, batch_first=True)
        self.head = torch.nn.Linear(5, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(input_ids))[0])  # type: ignore[no-any-return]


@pytest.mark.parametrize("side", ["train", "test"])
def test_tokens_of_a_recurrent_model_are_refused_by_name(side: str) -> None:
    torch.manual_seed(0)
    net = TinyGruLM().double().eval()
    ids = torch.randint(0, 8, (8, T), generator=torch.Generator().manual_seed(2))
    x = {"input_ids": ids}
    model = DirectInfluence(net, CausalLMTask(), regularization=0.1).fit([(x, ids)])
    per_sequence = model.influences({"input_ids": ids[:2]}, ids[:2], x, ids)
    assert per_sequence.shape == (2, 8) and bool(torch.isfinite(per_sequence).all())
    with pytest.raises(NotImplementedError, match=r"recurrent modules: rnn\)"):
        model.influences({"input_ids": ids[:2]}, ids[:2], x, ids, per_token=side)
