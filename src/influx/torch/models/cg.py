r"""Influence through conjugate gradient."""

from __future__ import annotations

from typing import Optional

import torch

from ..autodiff.derivatives import LossFunction
from ..composition.composable import TorchComposableInfluence
from ..composition.curvatures import ModeCurvature
from ..composition.solvers import CgSolver
from ..curvature.operators import SecondOrderMode, check_second_order_mode
from ..data.blocks import BlockMode, BlockStructure
from ..data.validation import RegularizationType
from ..inverse.preconditioner import Preconditioner

__all__ = ["CgInfluence"]


class CgInfluence(TorchComposableInfluence):
    r"""Influence through conjugate gradient: $(C_b + \lambda_b I)^{-1}$ applied iteratively.

    The curvature $C_b$ of each block (Hessian or Gauss-Newton matrix of the mean training
    loss) is never formed: every CG iteration applies it to all unconverged right-hand sides
    with one pass over the training data (Hessian-vector products, forward-over-reverse).
    `fit` only sets up the operators (and fits the preconditioner of every block); the solves
    happen in `influence_factors` and `influences`, one per call, stopping when
    $\|g - (C_b + \lambda_b I)x\| \le \max(\text{rtol}\,\|g\|, \text{atol})$ for each
    test gradient $g$. See [CgOperator][influx.torch.inverse.cg.CgOperator].

    After each call, `solver_diagnostics` reports per block the iterations, the achieved
    relative residual and whether every right-hand side converged.

    $C_b + \lambda_b I$ must be positive definite: with the Hessian of a non-convex model
    choose $\lambda$ large enough, or use `SecondOrderMode.GAUSS_NEWTON`.

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction.
        regularization: $\lambda \ge 0$, a number for all blocks or a dict naming every block;
            `"auto"` (the default) is $\operatorname{tr}(C_b) / P_b$ per block (0.1 of it for Kronecker-factored curvatures), None means
            none (see [influx.torch.inverse.damping][influx.torch.inverse.damping]).
        rtol: relative tolerance on the residual norm, $> 0$; None means $10^{-7}$, or ten
            times the machine epsilon of the compute dtype if larger.
        atol: absolute tolerance on the residual norm, $\ge 0$; None as for `rtol`.
        maxiter: maximum number of CG iterations; None means $10 P_b$ for a block of $P_b$
            parameters.
        progress: show a progress bar over the iterations.
        precompute_grad: with `SecondOrderMode.GAUSS_NEWTON`, compute the per-sample training
            gradients of each block once in `fit` and keep them in memory ($n \times P_b$
            numbers), so that every CG iteration is two matrix products instead of a pass over
            the data. No effect with `SecondOrderMode.HESSIAN`.
        preconditioner: a [Preconditioner][influx.torch.inverse.preconditioner.Preconditioner]; a copy
            is fitted to every block.
        solve_simultaneously: solve all right-hand sides together with block CG.
        warn_on_max_iteration: log a warning with the achieved residual when the tolerance is
            not reached within `maxiter` iterations; if False, log it at debug level.
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or an
            `OrderedDict[str, List[str]]` mapping block names to parameter names.
        second_order_mode: the curvature (a [SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode]).
        on_nonconvergence: `"warn"` (log, return the approximate result; pyDVL's behaviour)
            or `"raise"` (raise a [NonConvergenceError][influx.errors.NonConvergenceError]
            carrying the [SolverDiagnostics][influx.types.SolverDiagnostics]).
        compute_dtype: the dtype of curvature, factorisations and solves; None means float32
            for a float16 / bfloat16 model and the model's dtype otherwise (see
            [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]).

    Example:
        ```python
        model = CgInfluence(net, F.cross_entropy, regularization=0.01,
                            preconditioner=NystroemPreconditioner(rank=10)).fit(train_loader)
        values = model.influences(x_test, y_test, x_train, y_train)
        print(model.solver_diagnostics)
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType = "auto",
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
        maxiter: Optional[int] = None,
        progress: bool = False,
        precompute_grad: bool = False,
        preconditioner: Optional[Preconditioner] = None,
        solve_simultaneously: bool = False,
        warn_on_max_iteration: bool = True,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        on_nonconvergence: str = "warn",
        compute_dtype: Optional[torch.dtype] = None,
    ):
        self.second_order_mode = check_second_order_mode(second_order_mode)
        curvature = ModeCurvature(self.second_order_mode, precompute_grad)
        solver = CgSolver(
            rtol,
            atol,
            maxiter,
            progress,
            preconditioner,
            solve_simultaneously,
            warn_on_max_iteration,
            on_nonconvergence,
        )
        self._compose(
            model, loss, curvature, solver, block_structure, regularization, compute_dtype
        )
