"""Second derivatives through attention kernels without one (the fused kernels of
`scaled_dot_product_attention`, the default of Hugging Face models): the math kernel is
taken, with the values of eager attention. Skipped without `transformers`."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import torch
from helpers import loader, rel_err
from influx.torch import DirectInfluence, SecondOrderMode
from influx.torch.autodiff import stateless
from influx.torch.autodiff.hessian_products import create_batch_hvp_function
from influx.torch.autodiff.stateless import MathAttentionOnFailure, is_missing_attention_derivative

transformers = pytest.importorskip("transformers")

F = torch.nn.functional
VOCABULARY, LENGTH = 11, 5


def tiny_gpt2(attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCABULARY,
        n_positions=8,
        n_embd=4,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attention,
    )
    net = transformers.GPT2LMHeadModel(config).eval()
    net.transformer.wte.requires_grad_(False)  # tied to the head: the embeddings are fixed
    net.transformer.wpe.requires_grad_(False)
    assert net.config._attn_implementation == attention
    return net  # type: ignore[no-any-return]


def next_token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the token after the sequence, from the last position's logits."""
    return F.cross_entropy(logits[:, -1], y)


def tokens(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return (
        torch.randint(1, VOCABULARY, (n, LENGTH), generator=gen),
        torch.randint(0, VOCABULARY, (n,), generator=gen),
    )


def influences(attention: str, model: Any = DirectInfluence, **options: Any) -> torch.Tensor:
    x, y = tokens()
    fitted = model(tiny_gpt2(attention), next_token_loss, 0.1, **options).fit(loader(x, y, 3))
    return fitted.influences(x[:2], y[:2], x, y)  # type: ignore[no-any-return]


def test_hessian_through_sdpa_equals_eager_attention(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stateless, "_LOGGED_MATH_ATTENTION", set())
    with caplog.at_level(logging.INFO, logger="influx.torch.autodiff.stateless"):
        sdpa = influences("sdpa")
    assert "taking the math kernel instead" in caplog.text
    assert rel_err(sdpa, influences("eager")) < 1e-10


@pytest.mark.parametrize("reverse_max_rows", [None, 0])
def test_hessian_vector_products_through_sdpa_equal_eager_attention(
    reverse_max_rows: Any,
) -> None:
    """The `torch.autograd` products (default) and the vectorised `torch.func` ones."""
    x, y = tokens()
    products = []
    for attention in ("sdpa", "eager"):
        net = tiny_gpt2(attention)
        params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
        size = sum(p.numel() for p in params.values())
        hvp = create_batch_hvp_function(
            net, next_token_loss, params, reverse_max_rows=reverse_max_rows
        )
        vectors = torch.randn(3, size, generator=torch.Generator().manual_seed(0))
        products.append(hvp(params, x, y, vectors))
    assert rel_err(products[0], products[1]) < 1e-10


def test_generalized_gauss_newton_through_sdpa_equals_eager_attention() -> None:
    ggn = {"second_order_mode": SecondOrderMode.GENERALIZED_GAUSS_NEWTON}
    assert rel_err(influences("sdpa", **ggn), influences("eager", **ggn)) < 1e-10


def test_other_errors_are_not_taken_for_a_missing_attention_derivative() -> None:
    def fails() -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        MathAttentionOnFailure(fails)()
    missing = RuntimeError(
        "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not "
        "implemented"
    )
    assert is_missing_attention_derivative(missing)
    assert not is_missing_attention_derivative(ValueError("scaled_dot_product not implemented"))
