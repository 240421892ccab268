r"""Bilinear forms $B(u, v) = \langle A u, v\rangle$ of operators: how gradients are paired.

An operator knows its cheapest way to pair two sets of gradients: a generic operator applies
itself to the left-hand side (the few test gradients) and takes inner products; a dictionary
operator keeps gradients by parameter name; a low-rank operator pairs projections
([LowRankBilinearForm][influx.torch.inverse.low_rank.LowRankBilinearForm]).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, TypeVar

import torch

from ...types import BilinearForm
from ..data.batches import TorchBatch
from .provider import TorchGradientProvider

__all__ = [
    "DictBilinearForm",
    "OperatorBilinearForm",
    "OperatorBilinearFormType",
    "perturbation_product",
]


def perturbation_product(
    left: torch.Tensor, right_mixed: torch.Tensor, x_shape: Tuple[int, ...]
) -> torch.Tensor:
    """$\\langle l_i, m_{jf}\\rangle$ for `left` `(N, P)` and `right_mixed` `(M, F, P)`."""
    values = torch.einsum("ip,jfp->ijf", left, right_mixed)
    return values.reshape(left.shape[0], right_mixed.shape[0], *x_shape)


class OperatorBilinearForm(BilinearForm[torch.Tensor, TorchBatch, TorchGradientProvider]):
    r"""The bilinear form $B(u, v) = \langle A u, v\rangle$ of a tensor operator $A$.

    The operator is applied to the left-hand side only: for influences, the (few) test
    gradients.
    """

    def __init__(self, operator: Any):
        self.operator = operator

    def to(self, device: torch.device) -> "OperatorBilinearForm":
        """Move the operator to `device`; return self."""
        self.operator = self.operator.to(device)
        return self

    def inner_prod(self, left: torch.Tensor, right: Optional[torch.Tensor]) -> torch.Tensor:
        r"""$\langle A u_i, v_j\rangle$ for the rows of `left` and `right`, `(N_left, N_right)`."""
        right = left if right is None else right
        return self.operator.apply(left) @ right.T

    def mixed_grads_inner_prod(
        self,
        left: TorchBatch,
        right: Optional[TorchBatch],
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        right = left if right is None else right
        left_factors = self.operator.apply(gradient_provider.flat_grads(left))
        right_mixed = gradient_provider.flat_mixed_grads(right)
        return perturbation_product(
            left_factors, right_mixed, gradient_provider.perturbation_shape(right)
        )


class DictBilinearForm(OperatorBilinearForm):
    r"""Bilinear form of a [TensorDictOperator][influx.torch.curvature.tensor_operator.TensorDictOperator].

    Pairs gradients kept as dictionaries by parameter name, avoiding the flattening of
    gradients into one vector: $B(u, v) = \sum_k \langle (A u)_k, v_k\rangle$.
    """

    def __init__(self, operator: Any):
        super().__init__(operator)

    def grads_inner_prod(
        self,
        left: TorchBatch,
        right: Optional[TorchBatch],
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        left_grads = gradient_provider.grads(left)
        right_grads = left_grads if right is None else gradient_provider.grads(right)
        applied = self.operator.apply_to_dict(left_grads)
        return self._dict_inner_prod(applied, right_grads)

    @staticmethod
    def _dict_inner_prod(
        left: Dict[str, torch.Tensor], right: Dict[str, torch.Tensor]
    ) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for key, value in left.items():
            term = value.reshape(value.shape[0], -1) @ right[key].reshape(right[key].shape[0], -1).T
            total = term if total is None else total + term
        assert total is not None
        return total


OperatorBilinearFormType = TypeVar("OperatorBilinearFormType", bound=OperatorBilinearForm)
