r"""Per-token influences of sequence models: which test tokens, which training tokens.

For a task whose per-sample quantity is a sum over the tokens of a sequence (a
[CausalLMTask][influx.torch.data.causal_lm.CausalLMTask]: $m(z') = \sum_t m_t(z')$ and
$\ell(z) = \sum_s \ell_s(z)$, each term a token's weighted loss), the influence splits over
tokens on either side:

$$
I(z', z) = \sum_t \underbrace{\langle A \nabla_\theta m_t(z'), \nabla_\theta \ell(z)
\rangle}_{\text{test side: } (n_{test}, T_{test}, n_{train})}
= \sum_s \underbrace{\langle A \nabla_\theta m(z'), \nabla_\theta \ell_s(z)
\rangle}_{\text{training side: } (n_{test}, n_{train}, T_{train})},
$$

with $A = \bigoplus_b (C_b + \lambda_b I)^{-1}$ the fitted block operators. Summed over the
tokens, both equal the per-sequence influences.

**Test side.** The gradients $\nabla_\theta m_t(z'_i)$ of every token of every test sequence
come from one forward pass per test batch and backward passes vectorised over the tokens
(`vmap` of `jacrev`), not from one pass per token; each block's operator is applied to
them and the products with the training gradients summed over blocks.

**Training side.** For a block of one Kronecker-factored layer (EK-FAC, K-FAC), the
per-sample gradient is a sum over the layer's positions,
$\nabla_W \ell(z) = \sum_s \delta_s \tilde a_s^\top$, with $\tilde a_s$ the layer's input
and $\delta_s$ the gradient of the sequence's loss with respect to its output at position
$s$ (what the layer recorder gives, one forward and one backward pass per training batch).
The contribution of position $s$ is that term: the contraction
$\delta_s^\top U_i \tilde a_s$ with the test factor $U_i = A \nabla_W m(z'_i)$ as a matrix,
without the sum over positions. For the other blocks (and methods), the training side is
split over the tokens' loss terms, $\nabla_\theta \ell(z) = \sum_s \nabla_\theta
\ell_s(z)$: one gradient per training token (vectorised backward passes, as on the test side,
memory $n_{train} \times T \times P$), slower. The two splits differ for a model that mixes
positions (attention): the first attributes to position $s$ what passes through the layer
there, the second what token $s$'s loss owes to the parameters; both sum over the tokens to
the per-sequence influences.

The task must provide `token_measurements(model, x, y)` (the test side) and
`token_loss_terms(model, x, y)` (the training side), both `(N, T)` and summing over $T$ to the
per-sample measurement and loss.

**Factors and calculators.** The test factors a side pairs with the training data are
computed once per test batch: those of every test token, `(n_test, T_test, F)`
(`influence_factors(..., per_token="test")`), or those of the sequences for the training side;
`influences_from_factors(..., per_token=...)` pairs them with any number of training batches,
which is what the calculators do. `max_length` pads the token axis with zeros, so that
batches of sequences of different lengths give chunks of one shape.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Optional

from torch.func import jacrev, vmap
from torch.utils import _pytree as pytree

import torch

from ...base_influence_function_model import InfluenceFunctionModel
from ...types import TOKEN_AXES, InfluenceMode, check_mode
from ..autodiff.derivatives import create_batch_loss_function
from ..autodiff.model_call import is_data_dependent_control_flow, vmap_unsupported_modules
from ..data.structures import rows
from ..kfac.layers import layers_for_parameters
from ..kfac.operators import KroneckerFactoredCurvature, KroneckerFactoredOperator
from ..kfac.signals import SignalRecorder

__all__ = [
    "PER_TOKEN_SIDES",
    "check_per_token",
    "pad_tokens",
    "per_token_factors",
    "per_token_scores",
    "PerTokenInfluences",
    "TokenObjective",
    "token_factors_by_block",
    "token_gradients",
]

PER_TOKEN_SIDES = ("test", "train")
"""The values of `per_token`."""

ParamDict = Dict[str, torch.Tensor]


class TokenObjective:
    """A task whose loss and measurement are the per-token values `(N, T)` of another task:
    what [token_gradients][influx.torch.composition.per_token.token_gradients] differentiates.

    Args:
        task: a task with `token_measurements(model, x, y)` and `token_loss_terms(model, x, y)`.
    """

    def __init__(self, task: Any):
        self.task = task

    def loss(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        return self.task.token_loss_terms(model, x, y)  # type: ignore[no-any-return]

    def measurement(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        return self.task.token_measurements(model, x, y)  # type: ignore[no-any-return]

    def perturbation_input(self, x: Any) -> Optional[str]:
        return None


SIDE_METHODS = {"test": "token_measurements", "train": "token_loss_terms"}
"""The method of the task each side of `per_token` needs."""


def check_per_token(
    influence: Any, per_token: Optional[str], mode: InfluenceMode = InfluenceMode.Up
) -> None:
    """Raise unless `per_token` is None or a side the model's task supports, in `Up` mode: a
    ValueError for another value or mode, a TypeError for a task without the side's
    per-token values."""
    if per_token is None:
        return
    if per_token not in PER_TOKEN_SIDES:
        raise ValueError(
            f"Parameter 'per_token' must be None, 'test' or 'train', got {per_token!r}."
        )
    if check_mode(mode) is not InfluenceMode.Up:
        raise ValueError(
            f"Parameter 'mode' must be InfluenceMode.Up with per_token, got {mode.name}."
        )
    task = getattr(influence, "loss", None)
    method = SIDE_METHODS[per_token]
    if not callable(getattr(task, method, None)):
        raise TypeError(
            f"Parameter 'per_token' needs a task with per-token values ({method} for "
            f"per_token={per_token!r}, e.g. influx.torch.CausalLMTask), got "
            f"{type(task).__name__}."
        )


def pad_tokens(values: torch.Tensor, axis: int, max_length: Optional[int]) -> torch.Tensor:
    """`values` with zeros appended along the token `axis` up to `max_length` (as they are
    without it); a ValueError naming `max_length` for longer sequences."""
    if max_length is None:
        return values
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"Parameter 'max_length' must be a positive int, got {max_length!r}.")
    length = values.shape[axis]
    if length > max_length:
        raise ValueError(
            f"Parameter 'max_length' ({max_length}) is shorter than the sequences of the batch "
            f"({length} tokens)."
        )
    if length == max_length:
        return values
    shape = list(values.shape)
    shape[axis] = max_length - length
    return torch.cat([values, values.new_zeros(shape)], dim=axis)


def token_gradients(
    model: torch.nn.Module, task: Any, params: ParamDict, x: Any, y: Any, measurement: bool
) -> ParamDict:
    r"""$\{\text{name}: (\nabla_\theta v_{it})_{it}\}$, shapes `(N, T, *p.shape)`, for the
    per-token values $v_{it}$ of the task (its measurements, or its loss terms unless
    `measurement`): one forward pass per sample, vectorised over the samples, and backward
    passes vectorised over the tokens.

    A model that `vmap` cannot map over the samples (a branch on the values of its inputs) is
    differentiated one sample at a time, still vectorised over the tokens.

    Raises:
        NotImplementedError: for a model with recurrent layers, whose kernels `torch.func`
            can vectorise neither over samples nor over tokens.
    """
    recurrent = vmap_unsupported_modules(model)
    if recurrent:
        raise NotImplementedError(
            "Per-token gradients of models with recurrent layers are not supported "
            f"(recurrent modules: {', '.join(recurrent)}); per-sequence influences are "
            "(per_token=None), and so are per-token scores of the Kronecker-factored layers of "
            "EK-FAC and the Kronecker projection."
        )
    batch_values = create_batch_loss_function(model, TokenObjective(task), params, measurement)

    def single(p: ParamDict, xi: Any, yi: Any) -> torch.Tensor:
        unsqueeze = lambda t: t.unsqueeze(0)  # noqa: E731
        return batch_values(p, pytree.tree_map(unsqueeze, xi), pytree.tree_map(unsqueeze, yi))[0]

    jacobian = jacrev(single)
    try:
        return vmap(jacobian, in_dims=(None, 0, 0))(params, x, y)  # type: ignore[no-any-return]
    except RuntimeError as error:
        if not is_data_dependent_control_flow(error):
            raise
    n = int(pytree.tree_leaves(x)[0].shape[0])
    parts = [
        jacobian(params, *[pytree.tree_map(lambda t: t[0], rows(v, i, i + 1)) for v in (x, y)])
        for i in range(n)
    ]
    return {name: torch.stack([part[name] for part in parts]) for name in params}


def _block_coordinates(block: Any, flat: torch.Tensor) -> torch.Tensor:
    """Gradients `(..., p_b)` in the block's parameter order as the block's operator takes
    them: projected for a block of projected gradients, else as they are."""
    projection = getattr(block.gradient_provider, "projection", None)
    return flat if projection is None else projection.project_flat(flat)  # type: ignore[no-any-return]


CHUNK_ELEMENTS = 1 << 24
"""The largest intermediate `(n_test, chunk, T, m)` of the position scores, in elements."""


def _position_scores(u: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    r"""$\delta_{js}^\top U_i \tilde a_{js}$ `(n_test, n_train, T)` for test factors $U$
    `(n_test, m, k)`, inputs $\tilde a$ `(n_train, T, k)` and output gradients $\delta$
    `(n_train, T, m)`, over chunks of training sequences."""
    n_test, m = u.shape[0], u.shape[1]
    n_train, t = a.shape[0], a.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, n_test * t * m))
    parts = []
    for start in range(0, n_train, chunk):
        stop = start + chunk
        left = torch.einsum("imk,jsk->ijsm", u, a[start:stop])
        parts.append(torch.einsum("ijsm,jsm->ijs", left, d[start:stop]))
        del left
    return torch.cat(parts, dim=1)


def _block_params(blocks: Any) -> ParamDict:
    params: ParamDict = {}
    for block in blocks.values():
        params.update(block.gradient_provider.params)
    return params


def token_factors_by_block(influence: Any, test: Any) -> "OrderedDict[str, torch.Tensor]":
    r"""The factors $A_b \nabla_{\theta_b} m_t(z'_i)$ `(n_test, T_test, F_b)` of every test
    token, by block: one forward pass for the batch, backward passes vectorised over the
    tokens."""
    blocks = influence.block_mapper.composable_block_dict
    params = _block_params(blocks)
    grads = token_gradients(influence.model, influence.loss, params, test.x, test.y, True)
    n, t = next(iter(grads.values())).shape[:2]
    result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for name, block in blocks.items():
        names = list(block.gradient_provider.params)
        flat = torch.cat([grads[p].reshape(n * t, -1) for p in names], dim=1)
        factors = block.op.apply(_block_coordinates(block, flat).to(block.op.dtype))
        result[name] = factors.reshape(n, t, -1)
    return result


def _test_side(
    mapper: Any, factors: "OrderedDict[str, torch.Tensor]", train: Any
) -> "OrderedDict[str, torch.Tensor]":
    """`(n_test, T_test, n_train)` by block from the token factors `(n_test, T_test, F_b)`."""
    n, t = next(iter(factors.values())).shape[:2]
    flat = OrderedDict((name, value.reshape(n * t, -1)) for name, value in factors.items())
    values = mapper.interactions_from_transformed_grads(flat, train, InfluenceMode.Up)
    return OrderedDict((name, value.reshape(n, t, -1)) for name, value in values.items())


def _training_side(
    influence: Any, mapper: Any, factors: "OrderedDict[str, torch.Tensor]", train: Any
) -> "OrderedDict[str, torch.Tensor]":
    """`(n_test, n_train, T_train)` by block from the test factors `(n_test, F_b)`: from the
    layer signals for the Kronecker-factored blocks, from the gradients of the training
    tokens' loss terms for the others."""
    task = influence.loss
    blocks = mapper.composable_block_dict
    specs = {}
    for name, block in blocks.items():
        kronecker = isinstance(block.op, (KroneckerFactoredOperator, KroneckerFactoredCurvature))
        if not kronecker or getattr(block.gradient_provider, "projection", None) is not None:
            continue
        found = layers_for_parameters(influence.model, block.gradient_provider.params)
        if len(found) == 1:
            specs[name] = next(iter(found.values()))
    result: Dict[str, torch.Tensor] = {}
    t_train = int(train.y.shape[1]) if isinstance(train.y, torch.Tensor) else None
    if specs:
        signals = SignalRecorder(influence.model, specs, task).record(train)
        for name, spec in specs.items():
            a, d = signals[name]
            if t_train is not None and a.shape[1] != t_train:
                raise ValueError(
                    f"Parameter 'per_token': layer {name!r} has {a.shape[1]} positions per "
                    f"training sequence, not its {t_train} tokens (a layer called more than "
                    "once, or a convolution); per-token scores need one position per token."
                )
            matrices = spec.matrix_from_flat(factors[name].to(a.dtype))  # (n_test, m, k)
            result[name] = _position_scores(matrices, a, d)
    rest = [name for name in blocks if name not in specs]
    if rest:
        params = _block_params({name: blocks[name] for name in rest})
        grads = token_gradients(influence.model, task, params, train.x, train.y, False)
        for name in rest:
            names = list(blocks[name].gradient_provider.params)
            flat = _block_coordinates(
                blocks[name], torch.cat([grads[p].flatten(2) for p in names], dim=2)
            )
            result[name] = torch.einsum("ip,jsp->ijs", factors[name].to(flat.dtype), flat)
    return OrderedDict((name, result[name]) for name in blocks)


def _split_factors(mapper: Any, factors: Any, per_token: str) -> "OrderedDict[str, torch.Tensor]":
    """Factors given as one tensor (or a dict by block) split by block, shapes checked:
    `(n_test, T_test, F)` for the test side, `(n_test, F)` for the training side."""
    blocks = mapper.composable_block_dict
    if isinstance(factors, dict):
        return mapper._to_block_dict(factors)  # type: ignore[no-any-return]
    sizes = [block.op.input_size for block in blocks.values()]
    ndim = 3 if per_token == "test" else 2
    if (
        not isinstance(factors, torch.Tensor)
        or factors.ndim != ndim
        or factors.shape[-1] != sum(sizes)
    ):
        shape = "(N, T, " if per_token == "test" else "(N, "
        got = tuple(factors.shape) if isinstance(factors, torch.Tensor) else type(factors).__name__
        raise ValueError(
            f"Parameter 'z_test_factors' must have shape {shape}{sum(sizes)}) with "
            f"per_token={per_token!r}, got {got}."
        )
    return OrderedDict(zip(blocks, torch.split(factors, sizes, dim=-1)))


def per_token_factors(
    influence: Any, x: Any, y: Any, per_token: str
) -> "OrderedDict[str, torch.Tensor]":
    """The test factors by block that the per-token influences of a side pair with the
    training data: of every token `(n_test, T_test, F_b)` for the test side, of every
    sequence `(n_test, F_b)` for the training side."""
    test = influence._create_test_batch(x, y)
    if per_token == "test":
        return token_factors_by_block(influence, test)
    return influence.block_mapper.transformed_grads(test)  # type: ignore[no-any-return]


def _check_training_data(x: Any, y: Any) -> None:
    if x is None or y is None:
        raise ValueError(
            "Parameters 'x' and 'y' (the training sequences) are required with per_token."
        )


def per_token_scores(
    influence: Any, factors: Any, x: Any, y: Any, per_token: str, mapper: Any = None
) -> "OrderedDict[str, torch.Tensor]":
    """The per-token influences of a side by block, from the factors of
    [per_token_factors][influx.torch.composition.per_token.per_token_factors] (a tensor
    concatenated over blocks or a dict by block), over the blocks of `mapper` (by default
    the model's)."""
    _check_training_data(x, y)
    mapper = influence.block_mapper if mapper is None else mapper
    by_block = _split_factors(mapper, factors, per_token)
    train = influence._create_batch(x, y)
    if per_token == "test":
        return _test_side(mapper, by_block, train)
    return _training_side(influence, mapper, by_block, train)


def _summed(values: "OrderedDict[str, torch.Tensor]") -> torch.Tensor:
    total: Optional[torch.Tensor] = None
    for value in values.values():
        total = value if total is None else total + value
    assert total is not None
    return total


class PerTokenInfluences:
    """The `per_token` and `by_block` arguments of the factors and influences of
    [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]
    (a base class placed before the framework-agnostic one)."""

    block_mapper: Any

    def check_per_token(
        self, per_token: Optional[str], mode: InfluenceMode = InfluenceMode.Up
    ) -> None:
        """Raise unless this model computes the per-token influences of side `per_token`
        (see [check_per_token][influx.torch.composition.per_token.check_per_token])."""
        check_per_token(self, per_token, mode)

    @InfluenceFunctionModel.fit_required
    def influence_factors(
        self, x: Any, y: Any, per_token: Optional[str] = None, max_length: Optional[int] = None
    ) -> torch.Tensor:
        r"""The influence factors $(C + \lambda I)^{-1} \nabla_\theta m(z'_i)$ `(N, F)` of
        the test points; with `per_token="test"` those of every test token's measurement,
        `(N, T, F)` (the token axis padded with zeros to `max_length` if given), which
        `influences_from_factors(..., per_token="test")` pairs with training data. With
        `per_token="train"` the factors are those of the sequences, as without it."""
        if per_token is None:
            return super().influence_factors(x, y)  # type: ignore[misc,no-any-return]
        check_per_token(self, per_token)
        factors = torch.cat(list(per_token_factors(self, x, y, per_token).values()), dim=-1)
        return pad_tokens(factors, 1, max_length) if per_token == "test" else factors

    @InfluenceFunctionModel.fit_required
    def influences_from_factors(
        self,
        z_test_factors: Any,
        x: Any,
        y: Any,
        mode: InfluenceMode = InfluenceMode.Up,
        per_token: Optional[str] = None,
        max_length: Optional[int] = None,
    ) -> torch.Tensor:
        """The influences of `(x, y)` from pre-computed factors; per token (see `influences`)
        from the factors of `influence_factors(..., per_token=...)`."""
        if per_token is None:
            return super().influences_from_factors(z_test_factors, x, y, mode)  # type: ignore[misc,no-any-return]
        check_per_token(self, per_token, mode)
        values = _summed(per_token_scores(self, z_test_factors, x, y, per_token))
        return pad_tokens(values, TOKEN_AXES[per_token], max_length)

    @InfluenceFunctionModel.fit_required
    def influences(
        self,
        x_test: Any,
        y_test: Any,
        x: Optional[Any] = None,
        y: Optional[Any] = None,
        mode: InfluenceMode = InfluenceMode.Up,
        per_token: Optional[str] = None,
        max_length: Optional[int] = None,
    ) -> torch.Tensor:
        r"""$I(z'_i, z_j)$ `(n_test, n_train)`, or per token for a task with per-token values
        ([CausalLMTask][influx.torch.data.causal_lm.CausalLMTask]): `per_token="test"` gives
        `(n_test, T_test, n_train)`, the influence on each test token's measurement, and
        `per_token="train"` gives `(n_test, n_train, T_train)`, the contribution of each
        training position; both sum over the tokens to the per-sequence values (see
        [influx.torch.composition.per_token][]). `max_length` pads the token axis with zeros
        (a fixed length for batches of different lengths); a longer batch is a ValueError.
        """
        if per_token is None:
            return super().influences(x_test, y_test, x, y, mode)  # type: ignore[misc,no-any-return]
        check_per_token(self, per_token, mode)
        _check_training_data(x, y)
        factors = per_token_factors(self, x_test, y_test, per_token)
        values = _summed(per_token_scores(self, factors, x, y, per_token))
        return pad_tokens(values, TOKEN_AXES[per_token], max_length)
