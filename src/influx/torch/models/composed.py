r"""Any curvature with any inverse method."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from ..autodiff.derivatives import LossFunction
from ..composition.block_mapper import TorchBlockMapper, TorchOperatorGradientComposition
from ..composition.composable import TorchComposableInfluence
from ..composition.curvatures import Curvature, KroneckerCurvature
from ..composition.solvers import Solver
from ..data.blocks import BlockMode, BlockStructure
from ..data.validation import RegularizationType
from ..kfac.scoring import layer_block_mapper

__all__ = ["ComposedInfluence"]


class ComposedInfluence(TorchComposableInfluence):
    r"""Influence with a chosen curvature and a chosen inverse method for every block.

    $$
    I(z', z) = \sum_b \nabla_{\theta_b} \ell(z')^\top A_b \nabla_{\theta_b} \ell(z), \qquad
    A_b \approx (C_b + \lambda_b I)^{-1},
    $$

    with $C_b$ from `curvature` and $A_b$ from `solver` (see
    [influx.torch.composition][influx.torch.composition]). The named models
    (`DirectInfluence`, `CgInfluence`, ...) are presets of this composition.

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction.
        curvature: e.g. `ModeCurvature(SecondOrderMode.GENERALIZED_GAUSS_NEWTON)` or
            `KroneckerCurvature(update_diagonal=True)`.
        solver: e.g. `CgSolver(preconditioner=JacobiPreconditioner())`, `ArnoldiSolver(rank=20)`.
        regularization: $\lambda \ge 0$, a number for all blocks or a dict naming every block;
            `"auto"` (the default) is $\operatorname{tr}(C_b) / P_b$ per block (0.1 of it for Kronecker-factored curvatures), None means
            none (see [influx.torch.inverse.damping][influx.torch.inverse.damping]).
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or an
            `OrderedDict[str, List[str]]` (ignored by curvatures with their own blocks, such as
            the Kronecker curvature's layers).
        compute_dtype: the dtype of curvature, factorisations and solves; None means float32
            for a float16 / bfloat16 model and the model's dtype otherwise (see
            [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]).

    Example:
        ```python
        model = ComposedInfluence(
            net, F.cross_entropy, KroneckerCurvature(), CgSolver(rtol=1e-8), regularization=0.01
        ).fit(train_loader)
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        curvature: Curvature,
        solver: Solver,
        regularization: RegularizationType = "auto",
        block_structure: BlockStructure = BlockMode.FULL,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        if not isinstance(curvature, Curvature):
            raise TypeError(
                f"Parameter 'curvature' must be a Curvature, got {type(curvature).__name__}."
            )
        if not isinstance(solver, Solver):
            raise TypeError(f"Parameter 'solver' must be a Solver, got {type(solver).__name__}.")
        self._compose(
            model, loss, curvature, solver, block_structure, regularization, compute_dtype
        )

    def _new_block_mapper(
        self, blocks: "OrderedDict[str, TorchOperatorGradientComposition]"
    ) -> TorchBlockMapper:
        # The blocks of a Kronecker curvature are layers: their training side is scored from
        # the layers' inputs and output gradients (influx.torch.kfac.scoring).
        if isinstance(self.curvature, KroneckerCurvature) and self.loss is not None:
            return layer_block_mapper(blocks, self.model, self.loss)
        return super()._new_block_mapper(blocks)
