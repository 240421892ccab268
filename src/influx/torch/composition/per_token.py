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
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from torch.func import jacrev, vmap
from torch.utils import _pytree as pytree

import torch

from ...base_influence_function_model import InfluenceFunctionModel
from ...types import InfluenceMode, check_mode
from ..autodiff.derivatives import create_batch_loss_function
from ..autodiff.model_call import is_data_dependent_control_flow
from ..data.structures import rows
from ..kfac.layers import layers_for_parameters
from ..kfac.operators import KroneckerFactoredCurvature, KroneckerFactoredOperator
from ..kfac.signals import SignalRecorder

__all__ = [
    "PER_TOKEN_SIDES",
    "PerTokenInfluences",
    "TokenObjective",
    "per_token_influences",
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


def check_token_task(loss: Any) -> None:
    """Raise a TypeError unless `loss` is a task with per-token values."""
    if not all(
        callable(getattr(loss, name, None)) for name in ("token_measurements", "token_loss_terms")
    ):
        raise TypeError(
            "Parameter 'per_token' needs a task with per-token values (token_measurements and "
            f"token_loss_terms, e.g. influx.torch.CausalLMTask), got {type(loss).__name__}."
        )


def token_gradients(
    model: torch.nn.Module, task: Any, params: ParamDict, x: Any, y: Any, measurement: bool
) -> ParamDict:
    r"""$\{\text{name}: (\nabla_\theta v_{it})_{it}\}$, shapes `(N, T, *p.shape)`, for the
    per-token values $v_{it}$ of the task (its measurements, or its loss terms unless
    `measurement`): one forward pass per sample, vectorised over the samples, and backward
    passes vectorised over the tokens.

    A model that `vmap` cannot map over the samples (a branch on the values of its inputs) is
    differentiated one sample at a time, still vectorised over the tokens.
    """
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


def per_token_influences(
    influence: Any,
    x_test: Any,
    y_test: Any,
    x: Any,
    y: Any,
    mode: InfluenceMode,
    per_token: str,
) -> torch.Tensor:
    """The per-token influences of a fitted
    [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]
    (see the module)."""
    mode = check_mode(mode)
    if per_token not in PER_TOKEN_SIDES:
        raise ValueError(
            f"Parameter 'per_token' must be None, 'test' or 'train', got {per_token!r}."
        )
    if mode is not InfluenceMode.Up:
        raise ValueError(
            f"Parameter 'mode' must be InfluenceMode.Up with per_token, got {mode.name}."
        )
    if x is None or y is None:
        raise ValueError(
            "Parameters 'x' and 'y' (the training sequences) are required with per_token."
        )
    task = influence.loss
    check_token_task(task)
    test = influence._create_test_batch(x_test, y_test)
    train = influence._create_batch(x, y)
    blocks = influence.block_mapper.composable_block_dict
    params: ParamDict = {}
    for block in blocks.values():
        params.update(block.gradient_provider.params)
    if per_token == "test":
        grads = token_gradients(influence.model, task, params, test.x, test.y, True)
        n, t = next(iter(grads.values())).shape[:2]
        total: Optional[torch.Tensor] = None
        for block in blocks.values():
            names = list(block.gradient_provider.params)
            flat = torch.cat([grads[name].reshape(n * t, -1) for name in names], dim=1)
            factors = block.op.apply(_block_coordinates(block, flat).to(block.op.dtype))
            values = block.interactions_from_transformed_grads(factors, train, mode)
            total = values if total is None else total + values
        assert total is not None
        return total.reshape(n, t, -1)
    return _training_side(influence, task, blocks, test, train, mode)


def _training_side(
    influence: Any, task: Any, blocks: Any, test: Any, train: Any, mode: InfluenceMode
) -> torch.Tensor:
    """`(n_test, n_train, T_train)`: from the layer signals for the Kronecker-factored blocks,
    from the gradients of the training tokens' loss terms for the others."""
    kronecker = {
        name: block
        for name, block in blocks.items()
        if isinstance(block.op, (KroneckerFactoredOperator, KroneckerFactoredCurvature))
    }
    specs = {}
    for name, block in list(kronecker.items()):
        if getattr(block.gradient_provider, "projection", None) is not None:
            kronecker.pop(name)
            continue
        found = layers_for_parameters(influence.model, block.gradient_provider.params)
        if len(found) != 1:
            kronecker.pop(name)
            continue
        specs[name] = next(iter(found.values()))
    total: Optional[torch.Tensor] = None
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
            factors = kronecker[name].transformed_grads(test)
            matrices = spec.matrix_from_flat(factors.to(a.dtype))  # (n_test, m, k)
            values = _position_scores(matrices, a, d)
            total = values if total is None else total + values
    rest = [block for name, block in blocks.items() if name not in specs]
    if rest:
        params: ParamDict = {}
        for block in rest:
            params.update(block.gradient_provider.params)
        grads = token_gradients(influence.model, task, params, train.x, train.y, False)
        for block in rest:
            factors = block.transformed_grads(test)
            names = list(block.gradient_provider.params)
            flat = _block_coordinates(
                block, torch.cat([grads[name].flatten(2) for name in names], dim=2)
            )
            values = torch.einsum("ip,jsp->ijs", factors.to(flat.dtype), flat)
            total = values if total is None else total + values
    assert total is not None
    return total


class PerTokenInfluences:
    """The `per_token` argument of the influences of
    [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]
    (a base class placed before the framework-agnostic one)."""

    @InfluenceFunctionModel.fit_required
    def influences(
        self,
        x_test: Any,
        y_test: Any,
        x: Optional[Any] = None,
        y: Optional[Any] = None,
        mode: InfluenceMode = InfluenceMode.Up,
        per_token: Optional[str] = None,
    ) -> torch.Tensor:
        r"""$I(z'_i, z_j)$ `(n_test, n_train)`, or per token for a task with per-token values
        ([CausalLMTask][influx.torch.data.causal_lm.CausalLMTask]): `per_token="test"` gives
        `(n_test, T_test, n_train)`, the influence on each test token's measurement, and
        `per_token="train"` gives `(n_test, n_train, T_train)`, the contribution of each
        training position; both sum over the tokens to the per-sequence values (see
        [influx.torch.composition.per_token][]).
        """
        if per_token is None:
            return super().influences(x_test, y_test, x, y, mode)  # type: ignore[misc,no-any-return]
        return per_token_influences(self, x_test, y_test, x, y, mode, per_token)
