"""Per-token influences: test-side and training-side splits that sum to the per-sequence
influences, for Direct and EK-FAC on a tiny GPT-2 and a plain module."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest

import torch
from influx.torch import CausalLMTask, DirectInfluence, EkfacInfluence, SecondOrderMode
from influx.torch.kfac.layers import is_conv1d

transformers = pytest.importorskip("transformers")

VOCAB, T = 11, 6


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def corpus(n: int, seed: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded sequences with a completion mask on their last two tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    lengths = torch.randint(4, T + 1, (n,), generator=g)
    positions = torch.arange(T)[None, :]
    mask = positions < lengths[:, None]
    completion = mask & (positions >= lengths[:, None] - 2)
    ids = ids.masked_fill(~mask, 0)
    x = {"input_ids": ids, "attention_mask": mask.long(), "completion_mask": completion.long()}
    return x, ids.masked_fill(~mask, -100)


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
    return {
        "direct": direct.fit([(x, y)]),
        "ekfac": ekfac.fit([(x, y)]),
        "data": (x, y),
    }


@pytest.mark.parametrize("method", ["direct", "ekfac"])
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
    for t in (2, 3):
        one = {**x_test, "completion_mask": torch.zeros_like(y_test)}
        one["completion_mask"][:, t] = x_test["completion_mask"][:, t]
        torch.testing.assert_close(
            model.influences(one, y_test, x, y), per_token[:, t], rtol=1e-10, atol=1e-12
        )
