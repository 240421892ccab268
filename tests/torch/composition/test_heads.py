"""Influences by block and by attention head: the blocks sum to the total, the heads of a
module to the module's score, and a head's score is the sum over its coordinates."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict

import pytest

import torch
from helpers import lm_corpus, tiny_gpt2
from influx.torch import (
    AttentionHeads,
    BlockMode,
    CausalLMTask,
    DirectInfluence,
    EkfacInfluence,
    ProjectedInfluence,
)
from influx.torch.composition.heads import head_index
from influx.torch.kfac.layers import is_conv1d
from references import per_sample_grads

pytest.importorskip("transformers")

C_ATTN = "transformer.h.0.attn.c_attn"


@pytest.fixture(scope="module")
def gpt2() -> Dict[str, Any]:
    net = tiny_gpt2()
    layers = [name for name, module in net.named_modules() if is_conv1d(module)]
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in layers))
    x, y = lm_corpus(8, 0)
    model = EkfacInfluence(net, True, loss=CausalLMTask(), regularization=0.1, layers=layers)
    return {"ekfac": model.fit([(x, y)]), "data": (x, y), "test": lm_corpus(3, 1)}


@pytest.mark.parametrize("per_token", [None, "test", "train"])
def test_blocks_sum_to_the_total(gpt2: Dict[str, Any], per_token: Any) -> None:
    model = gpt2["ekfac"]
    (x, y), (x_test, y_test) = gpt2["data"], gpt2["test"]
    total = model.influences(x_test, y_test, x, y, per_token=per_token)
    blocks = model.influences(x_test, y_test, x, y, per_token=per_token, by_block=True)
    assert list(blocks) == model.block_names and len(blocks) == 4
    torch.testing.assert_close(sum(blocks.values()), total, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("per_token", [None, "test", "train"])
def test_heads_of_c_attn_sum_to_its_score(gpt2: Dict[str, Any], per_token: Any) -> None:
    """GPT-2's fused q/k/v Conv1D, 2 heads: each head's score, summed over the heads, is the
    layer's; and a head's score is its q, k and v rows' share of the layer's."""
    model = gpt2["ekfac"]
    (x, y), (x_test, y_test) = gpt2["data"], gpt2["test"]
    layout = {C_ATTN: AttentionHeads(2, projections=3)}
    heads = model.influences(x_test, y_test, x, y, per_token=per_token, heads=layout)[C_ATTN]
    blocks = model.influences(x_test, y_test, x, y, per_token=per_token, by_block=True)
    module = blocks[C_ATTN]
    assert heads.shape == (*module.shape, 2)
    torch.testing.assert_close(heads.sum(-1), module, rtol=1e-10, atol=1e-12)
    assert bool((heads.abs().flatten(0, -2).amax(0) > 0).all())  # every head has a share


def test_the_fused_layout_of_c_attn(gpt2: Dict[str, Any]) -> None:
    """Output o of c_attn (24 = q | k | v of 8, 2 heads of 4) is head (o mod 8) // 4, in the
    weight stored (in, out) and in the bias."""
    block, index = head_index(gpt2["ekfac"], C_ATTN, AttentionHeads(2, projections=3))
    assert block == C_ATTN
    of_output = torch.tensor([0] * 4 + [1] * 4).repeat(3)
    expected = torch.cat([of_output.repeat(8), of_output])  # weight (8, 24) row-major, bias
    assert torch.equal(index, expected)


class Attention(torch.nn.Module):
    """A single attention layer with separate q / k / v projections, and a readout."""

    def __init__(self, d: int = 4, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q_proj = torch.nn.Linear(d, d)
        self.k_proj = torch.nn.Linear(d, d)
        self.v_proj = torch.nn.Linear(d, d)
        self.readout = torch.nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        split = lambda z: z.reshape(n, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(n, t, d)
        return self.readout(mixed.mean(1))


def test_heads_of_linear_projections_are_their_coordinates() -> None:
    """Direct on the whole model: head h of q_proj scores sum_{p in head h} u_p g_p, with
    explicit per-sample gradients; the heads of k_proj and v_proj likewise."""
    torch.manual_seed(0)
    net = Attention().double()
    x, y = torch.randn(10, 3, 4, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    x_test, y_test = torch.randn(3, 3, 4, dtype=torch.float64), torch.randn(3, 1)
    loss = torch.nn.functional.mse_loss
    model = DirectInfluence(net, loss, regularization=0.1).fit([(x, y)])
    layout = {name: AttentionHeads(2) for name in ("q_proj", "k_proj", "v_proj")}
    heads = model.influences(x_test, y_test.double(), x, y, heads=layout)
    u = model.influence_factors(x_test, y_test.double())
    g = per_sample_grads(net, loss, None, x, y)
    names = [name for name, _ in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    offsets = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    for module in layout:
        weight, bias = offsets[f"{module}.weight"], offsets[f"{module}.bias"]
        for h in range(2):
            rows = torch.arange(2 * h, 2 * h + 2)
            coordinates = torch.cat(
                [(weight + rows[:, None] * 4 + torch.arange(4)).reshape(-1), bias + rows]
            )
            expected = u[:, coordinates] @ g[:, coordinates].T
            torch.testing.assert_close(heads[module][..., h], expected, rtol=1e-10, atol=1e-12)


def test_head_arguments_are_checked(gpt2: Dict[str, Any]) -> None:
    model = gpt2["ekfac"]
    (x, y), (x_test, y_test) = gpt2["data"], gpt2["test"]
    with pytest.raises(ValueError, match="Parameter 'num_heads' must be a positive int"):
        AttentionHeads(0)
    with pytest.raises(TypeError, match="Parameter 'heads' must map module names to Attention"):
        model.influences(x_test, y_test, x, y, heads={C_ATTN: 2})
    with pytest.raises(TypeError, match="Parameter 'heads' must be a non-empty mapping"):
        model.influences(x_test, y_test, x, y, heads={})
    with pytest.raises(ValueError, match="Parameter 'heads': module .* has 24 output features"):
        model.influences(x_test, y_test, x, y, heads={C_ATTN: AttentionHeads(5)})
    with pytest.raises(TypeError, match="must be an nn.Linear or a GPT-2 Conv1D, got LayerNorm"):
        model.influences(x_test, y_test, x, y, heads={"transformer.ln_f": AttentionHeads(2)})
    with pytest.raises(ValueError, match="Parameter 'heads': the model has no module"):
        model.influences(x_test, y_test, x, y, heads={"nowhere": AttentionHeads(2)})
    with pytest.raises(ValueError, match="Parameters 'by_block' and 'heads'"):
        model.influences(x_test, y_test, x, y, by_block=True, heads={C_ATTN: AttentionHeads(2, 3)})
    net = gpt2["ekfac"].model
    projected = ProjectedInfluence(net, CausalLMTask(), projection_dim=8, regularization=0.1)
    projected.fit([(x, y)])
    with pytest.raises(ValueError, match="Parameter 'heads': block 'model' pairs projected"):
        projected.influences(x_test, y_test, x, y, heads={C_ATTN: AttentionHeads(2, 3)})
    blocks = OrderedDict([("mlp", ["transformer.h.0.mlp.c_fc.weight"])])
    direct = DirectInfluence(net, CausalLMTask(), block_structure=blocks, regularization=0.1)
    direct.fit([(x, y)])
    with pytest.raises(ValueError, match="module .*c_attn' has no trainable parameter in a"):
        direct.influences(x_test, y_test, x, y, heads={C_ATTN: AttentionHeads(2, 3)})
    assert BlockMode.FULL.value == "full"
