"""CausalLMTask: next-token cross-entropy per sequence, on a tiny GPT-2 and a plain module."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest

import torch
from influx.torch import CausalLMTask, DirectInfluence, SecondOrderMode

VOCAB, T = 13, 7


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).double().eval()


class PlainLM(torch.nn.Module):
    """Embedding, a causal running mean of the embeddings, a linear head: logits (N, T, V)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB, 5)
        self.head = torch.nn.Linear(5, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(ids)
        counts = torch.arange(1, ids.shape[1] + 1, dtype=e.dtype)[None, :, None]
        return self.head(torch.tanh(e.cumsum(1) / counts))


def lm_batch(n: int = 6, seed: int = 0, left: bool = False) -> Tuple[Dict[str, Any], Any]:
    """Random sequences of lengths 3..T, padded right (or left) with attention masks; the
    labels are the ids, -100 on padding and on the first token of odd sequences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    positions = torch.arange(T)[None, :]
    mask = positions < lengths[:, None] if not left else positions >= T - lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    labels = ids.masked_fill(~mask, -100)
    labels[1::2, 0] = -100
    completion = mask & (positions >= T - 2 if left else positions >= lengths[:, None] - 2)
    x = {"input_ids": ids, "attention_mask": mask.long(), "completion_mask": completion.long()}
    return x, labels


def reference_losses(
    logits: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Per-sequence loss, one token at a time."""
    out = []
    for i in range(labels.shape[0]):
        terms = [
            -torch.log_softmax(logits[i, t - 1], 0)[labels[i, t]]
            for t in range(1, labels.shape[1])
            if counted[i, t]
        ]
        total = torch.stack(terms).sum()
        out.append(total / len(terms) if reduction == "mean" else total)
    return torch.stack(out)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gpt2_loss_equals_the_token_by_token_reference(reduction: str) -> None:
    model = tiny_gpt2()
    x, y = lm_batch()
    task = CausalLMTask(reduction=reduction)  # type: ignore[arg-type]
    logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    counted = (y != -100) & (x["attention_mask"] != 0)
    expected = reference_losses(logits, y, counted, reduction)
    torch.testing.assert_close(task.sequence_losses(model, x, y), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(task.loss(model, x, y), expected.mean(), rtol=1e-12, atol=0)
    completion = counted & (x["completion_mask"] != 0)
    torch.testing.assert_close(
        task.measurement(model, x, y),
        reference_losses(logits, y, completion, reduction).mean(),
        rtol=1e-12,
        atol=0,
    )
    if reduction == "mean":  # Hugging Face's own loss of one sequence (it computes in float32)
        for i in range(3):
            hf = model(input_ids=x["input_ids"][i : i + 1], labels=y[i : i + 1]).loss
            torch.testing.assert_close(expected[i].float(), hf, rtol=1e-6, atol=0)


def test_left_padding_gives_the_unpadded_losses() -> None:
    model = tiny_gpt2()
    x, y = lm_batch(left=True)
    assert bool((x["attention_mask"][:, 0] == 0).any())
    task = CausalLMTask(position_ids_from_mask=True)
    padded = task.sequence_losses(model, x, y)
    for i in range(len(y)):
        keep = x["attention_mask"][i] != 0
        xi = {"input_ids": x["input_ids"][i, keep][None]}
        torch.testing.assert_close(
            task.sequence_losses(model, xi, y[i, keep][None]),
            padded[i : i + 1],
            rtol=1e-10,
            atol=1e-12,
        )


def test_plain_module_and_direct_influence() -> None:
    torch.manual_seed(0)
    model = PlainLM().double()
    x, y = lm_batch(8, seed=1)
    ids = x["input_ids"]
    task = CausalLMTask()
    counted = (y != -100) & (x["attention_mask"] != 0)
    # a tensor input is the ids; the attention mask is then carried by the labels only
    masked = y.masked_fill(~counted, -100)
    torch.testing.assert_close(
        task.sequence_losses(model, ids, masked),
        reference_losses(model(ids), y, counted, "sum"),
        rtol=1e-12,
        atol=0,
    )
    influence = DirectInfluence(
        model, task, regularization=0.1, second_order_mode=SecondOrderMode.GAUSS_NEWTON
    )
    influence.fit([(ids, masked)])
    values = influence.influences(ids[:3], masked[:3], ids, masked)
    assert values.shape == (3, 8) and bool(torch.isfinite(values).all())
    # influence of the sum task = that of per-sequence losses with the loss function below
    gradients = torch.func.vmap(
        torch.func.grad(
            lambda p, i, lab: task.loss(
                lambda ids_: torch.func.functional_call(model, p, (ids_,)), i[None], lab[None]
            )
        ),
        in_dims=(None, 0, 0),
    )(dict(model.named_parameters()), ids, masked)
    g = torch.cat([v.reshape(8, -1) for v in gradients.values()], dim=1)
    h = g.T @ g / 8 + 0.1 * torch.eye(g.shape[1], dtype=g.dtype)
    torch.testing.assert_close(values, g[:3] @ torch.linalg.solve(h, g.T), rtol=1e-8, atol=1e-10)


def test_gpt2_direct_gauss_newton_runs_on_padded_batches() -> None:
    model = tiny_gpt2()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("transformer.h.0.mlp"))
    x, y = lm_batch(8)
    task = CausalLMTask()
    influence = DirectInfluence(
        model, task, regularization=0.1, second_order_mode=SecondOrderMode.GAUSS_NEWTON
    )
    influence.fit([(x, y)])
    values = influence.influences({k: v[:2] for k, v in x.items()}, y[:2], x, y)
    assert values.shape == (2, 8) and bool(torch.isfinite(values).all())
    # the test side is the completion: without the mask, the full loss, another value
    full = {k: v[:2] for k, v in x.items() if k != "completion_mask"}
    assert not torch.allclose(influence.influences(full, y[:2], x, y), values)


def test_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="Parameter 'reduction' must be 'sum' or 'mean'"):
        CausalLMTask(reduction="max")  # type: ignore[arg-type]
    model = PlainLM().double()
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"Parameter 'y' must hold labels of shape \(2, 4\)"):
        CausalLMTask().loss(model, ids, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Parameter 'model' must return logits"):
        CausalLMTask().loss(lambda i: i.double().sum(1), ids, ids)
