r"""Exact influence through the dense curvature of each block."""

from __future__ import annotations

from typing import Optional

import torch

from ..autodiff.derivatives import LossFunction
from ..composition.composable import TorchComposableInfluence
from ..composition.curvatures import ModeCurvature
from ..composition.solvers import DirectSolver
from ..curvature.operators import SecondOrderMode, check_second_order_mode
from ..data.blocks import BlockMode, BlockStructure
from ..data.validation import RegularizationType

__all__ = ["DirectInfluence"]


class DirectInfluence(TorchComposableInfluence):
    r"""Exact influence through a dense curvature matrix, factorised once per block.

    On `fit`, the curvature $C_b$ of each block (Hessian, empirical Fisher or generalized
    Gauss-Newton matrix of the mean training loss, averaged over the data loader weighting every
    batch by its size) is formed as a dense $P_b \times P_b$ matrix and $C_b + \lambda_b I$ is
    factorised (Cholesky, or LU / pseudo-inverse when it is not positive definite; see
    [DirectSolveOperator][influx.torch.inverse.direct.DirectSolveOperator]). Influence factors are
    then $(C_b + \lambda_b I)^{-1} \nabla_{\theta_b} \ell(z')$ and

    $$
    I(z', z) = \sum_b \nabla_{\theta_b} \ell(z')^\top (C_b + \lambda_b I)^{-1}
    \nabla_{\theta_b} \ell(z) ,
    $$

    positive when $z$ helps $z'$, without a minus sign and without $1/n$.

    Memory is $O(P_b^2)$ per block: use it for models up to a few ten thousand parameters per
    block, or with a layer-wise or parameter-wise block structure.

    When $C_b + \lambda_b I$ is too ill-conditioned for the compute dtype (its condition
    number from the eigenvalues exceeds $1 / (100\,\varepsilon)$, see
    [influx.torch.curvature.conditioning][influx.torch.curvature.conditioning]), fitting raises an
    [IllConditionedError][influx.errors.IllConditionedError] naming $\lambda$ and the smallest
    safe value (`on_nonconvergence="raise"`, the default), or logs that message as a warning
    and reports the block as not converged in `solver_diagnostics` (`"warn"`).

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction, e.g.
            `torch.nn.functional.cross_entropy`.
        regularization: $\lambda \ge 0$, a number for all blocks or a dict naming every block;
            `"auto"` (the default) is $\operatorname{tr}(C_b) / P_b$ per block (0.1 of it for Kronecker-factored curvatures), None means
            none (see [influx.torch.inverse.damping][influx.torch.inverse.damping]).
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or an
            `OrderedDict[str, List[str]]` mapping block names to parameter names.
        second_order_mode: the curvature (a [SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode]).
        progress: show a progress bar over the batches while the dense curvature is formed.
        compute_dtype: the dtype of curvature, factorisations and solves; None means float32
            for a float16 / bfloat16 model and the model's dtype otherwise (see
            [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]).
        on_nonconvergence: `"raise"` (default) or `"warn"` for a block too ill-conditioned
            for the compute dtype (see above).

    Example:
        ```python
        model = DirectInfluence(net, F.cross_entropy, regularization=0.01).fit(train_loader)
        values = model.influences(x_test, y_test, x_train, y_train)  # (n_test, n_train)
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType = "auto",
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        progress: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
        on_nonconvergence: str = "raise",
    ):
        self.second_order_mode = check_second_order_mode(second_order_mode)
        curvature = ModeCurvature(self.second_order_mode, progress=progress)
        solver = DirectSolver(on_nonconvergence)
        if on_nonconvergence == "raise":  # the default: fits saved before it existed load
            self._settings.pop("on_nonconvergence", None)
        self._compose(
            model, loss, curvature, solver, block_structure, regularization, compute_dtype
        )
