r"""Influences split by block and by attention head.

A block's influence is a sum over its coordinates, $I_b(z', z) = \sum_{p \in b} u_p g_p$ with
$u = A_b \nabla_{\theta_b} m(z')$ the test factor and $g = \nabla_{\theta_b} \ell(z)$ the
training gradient, so any partition $\{S_h\}$ of (part of) the coordinates splits it:

$$
I_b(z', z) = \sum_h \langle u \odot \mathbb 1_{S_h}, g \rangle
+ \langle u \odot \mathbb 1_{b \setminus \cup_h S_h}, g \rangle .
$$

For the projections of multi-head attention, $S_h$ is the rows (output features) of head
$h$ in the weight and the bias of the module: the head's score is that of the masked factor
$u \odot \mathbb 1_{S_h}$, paired with the training data by the block's own machinery (per-sample
gradients, or for a Kronecker-factored layer $\sum_s \delta_s^\top (U \odot \mathbb
1_{S_h}) \tilde a_s$ from the layer signals, without a gradient); the masked factors of all
heads are stacked and paired in one pass over the training data. The heads of a module sum
to the module's score.

[AttentionHeads][influx.torch.composition.heads.AttentionHeads] says how the output features of
a module are laid out in heads: GPT-2's fused `c_attn` (a `Conv1D` whose outputs are
$[q \mid k \mid v]$, each `n_head` heads of `head_dim` features) is
`AttentionHeads(n_head, projections=3)`; the `q_proj`, `k_proj` and `v_proj` `nn.Linear` of
other transformers are `AttentionHeads(num_heads)` (with `num_key_value_heads` for `k_proj`
and `v_proj` under grouped-query attention).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

import torch

from ...base_influence_function_model import InfluenceFunctionModel
from ...types import TOKEN_AXES, InfluenceMode, check_mode
from ..kfac.layers import is_conv1d
from .per_token import (
    PerTokenInfluences,
    check_per_token,
    pad_tokens,
    per_token_factors,
    per_token_scores,
)

__all__ = ["AttentionHeads", "SplitInfluences", "head_influences", "head_index"]


@dataclass(frozen=True)
class AttentionHeads:
    """The layout of the output features of an attention projection in heads.

    Output feature $o$ of a module with $F$ output features belongs to head
    $(o \\bmod F / \\text{projections}) \\,//\\, d$, with head size
    $d = F / (\\text{projections} \\cdot \\text{num\\_heads})$: the features of a projection
    are consecutive, and within it those of a head.

    Args:
        num_heads: the number of heads of one projection.
        projections: the number of projections the module computes side by side: 3 for a
            fused query-key-value projection such as GPT-2's `c_attn`, 1 for `q_proj`.
    """

    num_heads: int
    projections: int = 1

    def __post_init__(self) -> None:
        for name in ("num_heads", "projections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Parameter '{name}' must be a positive int, got {value!r}.")

    def head_of_features(self, out_features: int, module: str) -> torch.Tensor:
        """The head of every output feature `(out_features,)`."""
        parts = self.projections * self.num_heads
        if out_features % parts:
            raise ValueError(
                f"Parameter 'heads': module {module!r} has {out_features} output features, not "
                f"a multiple of projections x num_heads = {self.projections} x "
                f"{self.num_heads}."
            )
        features = torch.arange(out_features)
        return (features % (out_features // self.projections)) // (out_features // parts)


def _module_heads(model: torch.nn.Module, module: str, heads: Any) -> Tuple[Any, torch.Tensor]:
    """The module and the head of every output feature."""
    if not isinstance(heads, AttentionHeads):
        raise TypeError(
            f"Parameter 'heads' must map module names to AttentionHeads, got "
            f"{type(heads).__name__} for {module!r}."
        )
    try:
        layer = model.get_submodule(module)
    except AttributeError as error:
        raise ValueError(f"Parameter 'heads': the model has no module {module!r}.") from error
    conv1d = is_conv1d(layer)
    if not (isinstance(layer, torch.nn.Linear) or conv1d):
        raise TypeError(
            f"Parameter 'heads': module {module!r} must be an nn.Linear or a GPT-2 Conv1D, got "
            f"{type(layer).__name__}."
        )
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    out_features = int(weight.shape[1] if conv1d else weight.shape[0])
    return layer, heads.head_of_features(out_features, module)


def head_index(influence: Any, module: str, heads: AttentionHeads) -> Tuple[str, torch.Tensor]:
    """The block holding the parameters of `module` and the head of every coordinate of the
    block's factors `(P_b,)` (-1 outside the module)."""
    layer, of_feature = _module_heads(influence.model, module, heads)
    own = {f"{module}.{name}": p for name, p in layer.named_parameters(recurse=False)}
    for name, block in influence.block_mapper.composable_block_dict.items():
        params = block.gradient_provider.params
        if not any(p in params for p in own):
            continue
        if getattr(block.gradient_provider, "projection", None) is not None:
            raise ValueError(
                f"Parameter 'heads': block {name!r} pairs projected gradients; heads need "
                "factors in parameter coordinates (a method without projection)."
            )
        parts = []
        for parameter, value in params.items():
            if parameter not in own:
                parts.append(torch.full((value.numel(),), -1, dtype=torch.long))
            elif value.ndim == 1:
                parts.append(of_feature)
            else:  # Linear (out, in), Conv1D (in, out)
                rows = of_feature[None, :] if is_conv1d(layer) else of_feature[:, None]
                parts.append(rows.expand(value.shape).reshape(-1))
        return name, torch.cat(parts)
    raise ValueError(
        f"Parameter 'heads': module {module!r} has no trainable parameter in a block of the model."
    )


def head_influences(
    influence: Any,
    heads: Mapping[str, AttentionHeads],
    x_test: Any,
    y_test: Any,
    x: Any,
    y: Any,
    per_token: Optional[str] = None,
    max_length: Optional[int] = None,
) -> "OrderedDict[str, torch.Tensor]":
    """{module: the module's influences split by head}, each of the shape of `influences`
    (per token with `per_token`) with a last axis of `num_heads` (see the module)."""
    if not isinstance(heads, Mapping) or not heads:
        raise TypeError(
            "Parameter 'heads' must be a non-empty mapping of module names to AttentionHeads, "
            f"got {heads!r}."
        )
    if x is None or y is None:
        raise ValueError("Parameters 'x' and 'y' (the training data) are required with heads.")
    mapper = influence.block_mapper
    if per_token is None:
        factors = mapper.transformed_grads(influence._create_test_batch(x_test, y_test))
        train = influence._create_batch(x, y)
    else:
        factors = per_token_factors(influence, x_test, y_test, per_token)
    result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for module, layout in heads.items():
        name, index = head_index(influence, module, layout)
        u = factors[name]
        n_heads = layout.num_heads
        masks = torch.stack([index == h for h in range(n_heads)]).to(u)
        stacked = u.unsqueeze(0) * masks.reshape(n_heads, *([1] * (u.ndim - 1)), -1)
        stacked = stacked.reshape(n_heads * u.shape[0], *u.shape[1:])
        single = mapper.subset([name])
        if per_token is None:
            values = single.interactions_from_transformed_grads(
                OrderedDict([(name, stacked)]), train, InfluenceMode.Up
            )[name]
        else:
            values = per_token_scores(
                influence, OrderedDict([(name, stacked)]), x, y, per_token, single
            )[name]
            values = pad_tokens(values, TOKEN_AXES[per_token], max_length)
        result[module] = values.reshape(n_heads, u.shape[0], *values.shape[1:]).movedim(0, -1)
    return result


class SplitInfluences(PerTokenInfluences):
    """The `influences` of
    [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]
    with its splits: per token, by block, by attention head (a base class placed before the
    framework-agnostic one)."""

    @InfluenceFunctionModel.fit_required
    def influences(  # type: ignore[override]
        self,
        x_test: Any,
        y_test: Any,
        x: Optional[Any] = None,
        y: Optional[Any] = None,
        mode: InfluenceMode = InfluenceMode.Up,
        per_token: Optional[str] = None,
        max_length: Optional[int] = None,
        by_block: bool = False,
        heads: Optional[Mapping[str, AttentionHeads]] = None,
    ) -> Any:
        r"""$I(z'_i, z_j)$ `(n_test, n_train)` (see `ComposableInfluence.influences`), or split:

        * `per_token="test"` / `"train"`: per token, `(n_test, T_test, n_train)` /
          `(n_test, n_train, T_train)`, summing over the tokens to the per-sequence values
          (see [influx.torch.composition.per_token][]; `max_length` pads the token axis
          with zeros, a longer batch is a ValueError);
        * `by_block=True`: a dict {block name: the block's influences}, summing to the
          total (per token with `per_token`);
        * `heads={module: AttentionHeads(...)}`: a dict {module: its influences split by
          head}, the shape of the influences with a last axis of `num_heads`, summing over
          it to the module's influences (see [influx.torch.composition.heads][]).
        """
        if heads is not None:
            if by_block:
                raise ValueError(
                    "Parameters 'by_block' and 'heads' split the influences two ways: pass "
                    "one of them."
                )
            check_per_token(self, per_token, mode)
            if check_mode(mode) is not InfluenceMode.Up:
                raise ValueError(
                    f"Parameter 'mode' must be InfluenceMode.Up with heads, got {mode.name}."
                )
            return head_influences(self, heads, x_test, y_test, x, y, per_token, max_length)
        if not by_block:
            return super().influences(x_test, y_test, x, y, mode, per_token, max_length)
        if per_token is None:
            return self.influences_by_block(x_test, y_test, x, y, mode)  # type: ignore[attr-defined]
        check_per_token(self, per_token, mode)
        if x is None or y is None:
            raise ValueError(
                "Parameters 'x' and 'y' (the training sequences) are required with per_token."
            )
        factors = per_token_factors(self, x_test, y_test, per_token)
        values = per_token_scores(self, factors, x, y, per_token)
        axis = TOKEN_AXES[per_token]
        return OrderedDict((name, pad_tokens(v, axis, max_length)) for name, v in values.items())
