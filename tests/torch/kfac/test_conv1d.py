"""transformers' Conv1D (GPT-2's linear layers) in K-FAC, EK-FAC and the Kronecker projection:
the same influences as the equivalent `nn.Linear`."""

from __future__ import annotations

from typing import Any, Tuple

import pytest
import torch.nn.functional as F

import torch
from influx.torch import CausalLMTask, EkfacInfluence, ProjectedInfluence
from influx.torch.kfac.layers import find_layers, is_conv1d, layers_for_parameters

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


class MeanOverPositions(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def twin_models() -> Tuple[torch.nn.Module, torch.nn.Module]:
    """The same function twice, its second layer a Conv1D in one and a Linear in the other."""
    torch.manual_seed(0)
    conv = Conv1D(3, 5)
    torch.nn.init.normal_(conv.bias)
    first = torch.nn.Linear(4, 5)
    with_conv = torch.nn.Sequential(first, torch.nn.Tanh(), conv, MeanOverPositions()).double()
    linear = torch.nn.Linear(5, 3)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    with_linear = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), linear, MeanOverPositions()
    ).double()
    with_linear[0].load_state_dict(with_conv[0].state_dict())
    return with_conv, with_linear


def data() -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def test_conv1d_is_a_supported_layer() -> None:
    with_conv, _ = twin_models()
    x, _ = data()
    torch.testing.assert_close(with_conv(x), twin_models()[1](x), rtol=1e-14, atol=1e-14)
    assert is_conv1d(with_conv[2]) and not is_conv1d(with_conv[0])
    spec = find_layers(with_conv)["2"]
    assert (spec.out_dim, spec.in_dim, spec.weight_transposed) == (3, 5, True)
    assert list(layers_for_parameters(with_conv, ["2.weight"])) == ["2"]
    flat = torch.randn(2, 18, dtype=torch.float64)
    matrices = spec.matrix_from_flat(flat)
    torch.testing.assert_close(matrices[:, :, :5], flat[:, :15].reshape(2, 5, 3).transpose(1, 2))
    torch.testing.assert_close(spec.flat_from_matrix(matrices), flat)


@pytest.mark.parametrize("update_diagonal", [False, True], ids=["kfac", "ekfac"])
def test_kfac_on_conv1d_equals_kfac_on_linear(update_diagonal: bool) -> None:
    x, y = data()
    values = []
    for model in twin_models():
        influence = EkfacInfluence(
            model, update_diagonal, loss=F.cross_entropy, regularization=0.01
        ).fit([(x, y)])
        values.append(influence.influences(x[:4], y[:4], x, y))
        factors = influence.influence_factors(x[:4], y[:4])
        assert factors.shape == (4, 25 + 18)
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-12)


def test_kronecker_projection_on_conv1d_equals_linear() -> None:
    x, y = data()
    values = []
    for model in twin_models():
        influence = ProjectedInfluence(
            model, F.cross_entropy, projection_dim=8, regularization=0.01, seed=3
        ).fit([(x, y)])
        values.append(influence.influences(x[:4], y[:4], x, y))
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-12)


def test_ekfac_on_the_conv1d_layers_of_gpt2() -> None:
    config = transformers.GPT2Config(
        vocab_size=11,
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
    net: Any = transformers.GPT2LMHeadModel(config).double().eval()
    layers = [name for name, module in net.named_modules() if is_conv1d(module)]
    assert len(layers) == 4
    ids = torch.randint(0, 11, (10, 6), generator=torch.Generator().manual_seed(2))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = EkfacInfluence(net, True, loss=CausalLMTask(), regularization=0.01, layers=layers)
    model.fit([(x, ids)])
    assert model.block_names == layers
    values = model.influences({k: v[:2] for k, v in x.items()}, ids[:2], x, ids)
    assert values.shape == (2, 10) and bool(torch.isfinite(values).all())
    # a sequence helps itself most
    assert bool((values.argmax(1) == torch.arange(2)).all())


def test_a_saved_conv1d_fit_loads(tmp_path: Any) -> None:
    """The transposed layout is part of the operators' state."""
    x, y = data()
    model, _ = twin_models()
    fitted = EkfacInfluence(model, True, loss=F.cross_entropy, regularization=0.01).fit([(x, y)])
    path = fitted.save(tmp_path / "fit")
    loaded = EkfacInfluence(model, True, loss=F.cross_entropy, regularization=0.01).load_fit(path)
    torch.testing.assert_close(
        loaded.influences(x[:3], y[:3], x, y),
        fitted.influences(x[:3], y[:3], x, y),
        rtol=1e-14,
        atol=1e-14,
    )
