r"""One block of an influence model, and the map of a computation over blocks.

A [TorchOperatorGradientComposition][influx.torch.composition.block_mapper.TorchOperatorGradientComposition]
joins an operator $A_b \approx (C_b + \lambda_b I)^{-1}$ and the per-sample gradients of the
same block of parameters; a [TorchBlockMapper][influx.torch.composition.block_mapper.TorchBlockMapper]
maps influence factors, influences and self-influences over the ordered blocks of a model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, TypeVar

import torch

from ...types import BlockMapper, InfluenceMode, OperatorGradientComposition, check_mode
from ..curvature.tensor_operator import TensorOperator
from ..data.batches import TorchBatch
from ..gradients.bilinear import perturbation_product
from ..gradients.provider import TorchGradientProvider

__all__ = ["TorchBlockMapper", "TorchOperatorGradientComposition", "TorchOperatorType"]


TorchOperatorType = TypeVar("TorchOperatorType", bound=TensorOperator)


class TorchOperatorGradientComposition(
    OperatorGradientComposition[torch.Tensor, TorchBatch, TensorOperator, TorchGradientProvider]
):
    """One block: a [TensorOperator][influx.torch.curvature.tensor_operator.TensorOperator] with the gradient
    provider restricted to the same parameters.

    Args:
        op: the operator, usually $(C_b + \\lambda_b I)^{-1}$ for the block's curvature.
        gp: per-sample gradients restricted to the block.
    """

    op: TensorOperator
    gradient_provider: TorchGradientProvider

    def __init__(self, op: TensorOperator, gp: TorchGradientProvider):
        if op.input_size != gp.input_size:
            raise ValueError(
                f"Operator input size {op.input_size} does not match the gradient size "
                f"{gp.input_size} of the block."
            )
        super().__init__(op, gp)

    def to(self, device: torch.device) -> "TorchOperatorGradientComposition":
        """Move the operator and the gradient provider to `device`; return self."""
        self.op = self.op.to(device)
        self.gradient_provider = self.gradient_provider.to(device)
        return self

    def interactions_from_transformed_grads(
        self, left_factors: torch.Tensor, right_batch: TorchBatch, mode: InfluenceMode
    ) -> torch.Tensor:
        r"""$\langle u_i, \nabla_\theta \ell(\text{right}_j)\rangle$ for pre-computed factors $u_i$.

        With $\nabla_x \nabla_\theta \ell(\text{right}_j)$ on the right for `Perturbation`.
        """
        mode = check_mode(mode)
        size = self.gradient_provider.input_size
        if left_factors.ndim != 2 or left_factors.shape[1] != size:
            raise ValueError(
                f"Parameter 'z_test_factors' must have shape (N, {size}), got "
                f"{tuple(left_factors.shape)}."
            )
        left_factors = left_factors.to(self.op.device)
        if mode is InfluenceMode.Up:
            return left_factors @ self.gradient_provider.flat_grads(right_batch).T
        right_mixed = self.gradient_provider.flat_mixed_grads(right_batch)
        shape = self.gradient_provider.perturbation_shape(right_batch)
        return perturbation_product(left_factors, right_mixed, shape)

    def self_interactions_from_transformed_grads(
        self, factors: torch.Tensor, batch: TorchBatch, mode: InfluenceMode
    ) -> torch.Tensor:
        mode = check_mode(mode)
        factors = factors.to(self.op.device)
        if mode is InfluenceMode.Up:
            return (factors * self.gradient_provider.flat_grads(batch)).sum(dim=1)
        mixed = self.gradient_provider.flat_mixed_grads(batch)
        values = torch.einsum("ip,ifp->if", factors, mixed)
        return values.reshape(len(batch), *self.gradient_provider.perturbation_shape(batch))


class TorchBlockMapper(BlockMapper[torch.Tensor, TorchBatch, TorchOperatorGradientComposition]):
    """Maps computations over blocks of [TorchOperatorGradientComposition][influx.torch.composition.block_mapper.TorchOperatorGradientComposition]."""

    composable_block_dict: "OrderedDict[str, TorchOperatorGradientComposition]"

    def to(self, device: torch.device) -> "TorchBlockMapper":
        """Move every block to `device`; return self."""
        for block in self.composable_block_dict.values():
            block.to(device)
        return self

    def subset(self, names: Sequence[str]) -> "TorchBlockMapper":
        """The map over the blocks `names` only, in this mapper's order."""
        return TorchBlockMapper(self._blocks_named(names))

    def _blocks_named(
        self, names: Sequence[str]
    ) -> "OrderedDict[str, TorchOperatorGradientComposition]":
        unknown = [name for name in names if name not in self.composable_block_dict]
        if unknown:
            raise ValueError(
                f"Unknown blocks {unknown}: the blocks are {list(self.composable_block_dict)}."
            )
        return OrderedDict(
            (name, block) for name, block in self.composable_block_dict.items() if name in names
        )

    def _split_to_blocks(self, z: torch.Tensor, dim: int = -1) -> "OrderedDict[str, torch.Tensor]":
        sizes = [block.op.input_size for block in self.composable_block_dict.values()]
        if z.ndim != 2 or z.shape[dim] != sum(sizes):
            raise ValueError(
                f"Parameter 'z_test_factors' must have shape (N, {sum(sizes)}) (the number of "
                f"parameters of all blocks), got {tuple(z.shape)}."
            )
        return OrderedDict(zip(self.composable_block_dict, torch.split(z, sizes, dim=dim)))
