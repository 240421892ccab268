r"""Influence through LiSSA."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..autodiff.derivatives import LossFunction
from ..composition.composable import TorchComposableInfluence
from ..composition.curvatures import ModeCurvature
from ..composition.solvers import LissaSolver
from ..curvature.operators import SecondOrderMode, check_second_order_mode
from ..data.blocks import BlockMode, BlockStructure
from ..data.validation import RegularizationType

__all__ = ["LissaInfluence"]


class LissaInfluence(TorchComposableInfluence):
    r"""Influence through LiSSA, a stochastic iteration using one mini-batch per step.

    For each block, $(C_b + \lambda_b I)^{-1} g$ is approximated by the iteration

    $$
    h_{t+1} = g + (1 - d)\, h_t - \frac{(C_{b, t} + \lambda_b I)\, h_t}{s}, \qquad
    (C_b + \lambda_b I)^{-1} g \approx \frac{h_T}{s},
    $$

    with $C_{b,t}$ the curvature (Hessian or Gauss-Newton matrix) of the $t$-th mini-batch of
    the training loader, iterated repeatedly. See
    [LissaOperator][influx.torch.inverse.lissa.LissaOperator] for the choice of the scale $s$ (it
    must exceed half the largest batch eigenvalue; `scale="auto"` estimates it) and the
    divergence check. Each step costs one Hessian-vector product on one batch, so LiSSA suits
    large data sets; its result fluctuates with the batch size, and it needs many steps when
    $\lambda$ is small compared with the largest eigenvalue.

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction.
        regularization: $\lambda \ge 0$, a number for all blocks or a dict naming every block;
            `"auto"` (the default) is $\operatorname{tr}(C_b) / P_b$ per block (0.1 of it for Kronecker-factored curvatures), None means
            none (see [influx.torch.inverse.damping][influx.torch.inverse.damping]).
        maxiter: maximum number of iterations (batches).
        dampen: the dampening $d \in [0, 1)$.
        scale: the scale $s > 0$, or `"auto"`.
        rtol: tolerance on the relative change between iterations, $> 0$.
        progress: show a progress bar over the iterations.
        warn_on_max_iteration: log a warning with the achieved relative change when `rtol` is
            not reached within `maxiter` iterations; if False, log it at debug level.
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or an
            `OrderedDict[str, List[str]]` mapping block names to parameter names.
        second_order_mode: the curvature (a [SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode]).
        on_nonconvergence: `"warn"` (log, return the approximate result; pyDVL's behaviour)
            or `"raise"` (raise a [NonConvergenceError][influx.errors.NonConvergenceError]
            carrying the [SolverDiagnostics][influx.types.SolverDiagnostics]).
        seed: seed of the eigenvalue estimates (`scale="auto"`, divergence diagnosis); the
            batches are taken in the loader's order.
        compute_dtype: the dtype of curvature, factorisations and solves; None means float32
            for a float16 / bfloat16 model and the model's dtype otherwise (see
            [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType = "auto",
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: Union[float, str] = 10.0,
        rtol: float = 1e-4,
        progress: bool = False,
        warn_on_max_iteration: bool = True,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        on_nonconvergence: str = "warn",
        seed: Optional[int] = None,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        self.second_order_mode = check_second_order_mode(second_order_mode)
        curvature = ModeCurvature(self.second_order_mode)
        solver = LissaSolver(
            maxiter=maxiter,
            dampen=dampen,
            scale=scale,
            rtol=rtol,
            progress=progress,
            warn_on_max_iteration=warn_on_max_iteration,
            on_nonconvergence=on_nonconvergence,
            seed=seed,
        )
        self._compose(
            model, loss, curvature, solver, block_structure, regularization, compute_dtype
        )
