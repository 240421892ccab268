r"""Influence models: the user-facing classes that fit curvature and compute influences.

Every model here is a [TorchComposableInfluence][influx.torch.base.TorchComposableInfluence]:
the model's parameters are split into blocks and each block gets its own operator
$A_b \approx (C_b + \lambda_b I)^{-1}$, where $C_b$ is the Hessian or the Gauss-Newton matrix
of the mean training loss restricted to the block (see
[SecondOrderMode][influx.torch.operator.SecondOrderMode]).

**Sign and scale.** Entry $(i, j)$ of `influences` is

$$
I(z'_i, z_j) = \nabla_\theta \ell(z'_i)^\top (C + \lambda I)^{-1} \nabla_\theta \ell(z_j),
$$

without a minus sign and without a factor $1/n$: a positive value means that training point
$z_j$ helps (up-weighting it lowers the loss of) test point $z'_i$. `Perturbation` mode
differentiates the same quantity with respect to the features of $z_j$.
"""

from __future__ import annotations

import copy
import logging
from typing import Dict, Optional, Union

import torch
from torch.utils.data import DataLoader

from .base import (
    TensorOperator,
    TorchComposableInfluence,
    TorchOperatorGradientComposition,
)
from .batch_operation import BatchOperation, GaussNewtonBatchOperation, HessianBatchOperation
from .functional import LossFunction
from .iterative import (
    CgOperator,
    LissaOperator,
    _validate_cg_settings,
    _validate_lissa_settings,
)
from .operator import DirectSolveOperator, SecondOrderMode, curvature_operator, iterate_batches
from .preconditioner import Preconditioner
from .util import BlockMode, BlockStructure, RegularizationType

__all__ = ["DirectInfluence", "CgInfluence", "LissaInfluence"]

logger = logging.getLogger(__name__)


def _check_second_order_mode(mode: SecondOrderMode) -> SecondOrderMode:
    try:
        return SecondOrderMode(mode)
    except ValueError:
        valid = [m.name for m in SecondOrderMode]
        raise ValueError(
            f"Parameter 'second_order_mode' must be one of {valid}, got {mode!r}."
        ) from None


class DirectInfluence(TorchComposableInfluence):
    r"""Exact influence through a dense curvature matrix, factorised once per block.

    On `fit`, the curvature $C_b$ of each block (Hessian or Gauss-Newton matrix of the mean
    training loss, averaged over the data loader weighting every batch by its size) is formed
    as a dense $P_b \times P_b$ matrix and $C_b + \lambda_b I$ is factorised (Cholesky, or LU /
    pseudo-inverse when it is not positive definite; see
    [DirectSolveOperator][influx.torch.operator.DirectSolveOperator]). Influence factors are
    then $(C_b + \lambda_b I)^{-1} \nabla_{\theta_b} \ell(z')$ and

    $$
    I(z', z) = \sum_b \nabla_{\theta_b} \ell(z')^\top (C_b + \lambda_b I)^{-1}
    \nabla_{\theta_b} \ell(z) ,
    $$

    positive when $z$ helps $z'$, without a minus sign and without $1/n$.

    Memory is $O(P_b^2)$ per block: use it for models up to a few ten thousand parameters per
    block, or with a layer-wise or parameter-wise block structure.

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction, e.g.
            `torch.nn.functional.cross_entropy`.
        regularization: $\lambda \ge 0$, a float for all blocks or a dict keyed by block name.
        block_structure: a [BlockMode][influx.torch.util.BlockMode] or an
            `OrderedDict[str, List[str]]` mapping block names to parameter names.
        second_order_mode: the curvature, `SecondOrderMode.HESSIAN` or `GAUSS_NEWTON`.

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
        regularization: RegularizationType = None,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
    ):
        super().__init__(model, block_structure, regularization)
        self.loss = loss
        self.second_order_mode = _check_second_order_mode(second_order_mode)

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        ).to_dense()
        op = DirectSolveOperator(curvature, regularization=regularization)
        logger.debug(
            "Block %r: %d parameters, %s factorisation.",
            block_name,
            op.input_size,
            op.factorization,
        )
        return TorchOperatorGradientComposition(
            op, self._gradient_provider(self.loss, block_name, block_params)
        )


class _PrecomputedGaussNewtonOperator(TensorOperator):
    r"""The Gauss-Newton matrix $G = \frac{1}{n} J^\top J$ from per-sample gradients $J$
    `(n, P)` computed once: $V \mapsto (V J^\top) J / n$."""

    def __init__(self, batch_operation: GaussNewtonBatchOperation, data: DataLoader):
        grads = [
            batch_operation.per_sample_grads(batch)
            for batch in iterate_batches(data, batch_operation.device)
        ]
        if not grads:
            raise ValueError("Parameter 'data' yielded no batches.")
        self._grads = torch.cat(grads)
        self._size = batch_operation.input_size

    @property
    def input_size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._grads.device

    @property
    def dtype(self) -> torch.dtype:
        return self._grads.dtype

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor @ self._grads.T) @ self._grads / self._grads.shape[0]


class CgInfluence(TorchComposableInfluence):
    r"""Influence through conjugate gradient: $(C_b + \lambda_b I)^{-1}$ applied iteratively.

    The curvature $C_b$ of each block (Hessian or Gauss-Newton matrix of the mean training
    loss) is never formed: every CG iteration applies it to all unconverged right-hand sides
    with one pass over the training data (Hessian-vector products, forward-over-reverse).
    `fit` only sets up the operators (and fits the preconditioner of every block); the solves
    happen in `influence_factors` and `influences`, one per call, stopping when
    $\|g - (C_b + \lambda_b I)x\| \le \max(\text{rtol}\,\|g\|, \text{atol})$ for each
    test gradient $g$. See [CgOperator][influx.torch.iterative.CgOperator].

    After each call, `solver_diagnostics` reports per block the iterations, the achieved
    relative residual and whether every right-hand side converged.

    $C_b + \lambda_b I$ must be positive definite: with the Hessian of a non-convex model
    choose $\lambda$ large enough, or use `SecondOrderMode.GAUSS_NEWTON`.

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction.
        regularization: $\lambda \ge 0$, a float for all blocks or a dict keyed by block name.
        rtol: relative tolerance on the residual norm, $> 0$.
        atol: absolute tolerance on the residual norm, $\ge 0$.
        maxiter: maximum number of CG iterations; None means $10 P_b$ for a block of $P_b$
            parameters.
        progress: show a progress bar over the iterations.
        precompute_grad: with `SecondOrderMode.GAUSS_NEWTON`, compute the per-sample training
            gradients of each block once in `fit` and keep them in memory ($n \times P_b$
            numbers), so that every CG iteration is two matrix products instead of a pass over
            the data. No effect with `SecondOrderMode.HESSIAN`.
        preconditioner: a [Preconditioner][influx.torch.preconditioner.Preconditioner]; a copy
            is fitted to every block.
        solve_simultaneously: solve all right-hand sides together with block CG.
        warn_on_max_iteration: log a warning with the achieved residual when the tolerance is
            not reached within `maxiter` iterations; if False, log it at debug level.
        block_structure: a [BlockMode][influx.torch.util.BlockMode] or an
            `OrderedDict[str, List[str]]` mapping block names to parameter names.
        second_order_mode: the curvature, `SecondOrderMode.HESSIAN` or `GAUSS_NEWTON`.

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
        regularization: RegularizationType = None,
        rtol: float = 1e-7,
        atol: float = 1e-7,
        maxiter: Optional[int] = None,
        progress: bool = False,
        precompute_grad: bool = False,
        preconditioner: Optional[Preconditioner] = None,
        solve_simultaneously: bool = False,
        warn_on_max_iteration: bool = True,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
    ):
        super().__init__(model, block_structure, regularization)
        if preconditioner is not None and not isinstance(preconditioner, Preconditioner):
            raise TypeError(
                "Parameter 'preconditioner' must be a Preconditioner or None, got "
                f"{type(preconditioner).__name__}."
            )
        self.loss = loss
        self.rtol = rtol
        self.atol = atol
        self.maxiter = maxiter
        self.progress = progress
        self.precompute_grad = precompute_grad
        self.preconditioner = preconditioner
        self.solve_simultaneously = solve_simultaneously
        self.warn_on_max_iteration = warn_on_max_iteration
        self.second_order_mode = _check_second_order_mode(second_order_mode)
        _validate_cg_settings(rtol, atol, maxiter)

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        curvature: TensorOperator
        if self.precompute_grad and self.second_order_mode is SecondOrderMode.GAUSS_NEWTON:
            curvature = _PrecomputedGaussNewtonOperator(
                GaussNewtonBatchOperation(self.model, self.loss, block_params), data
            )
        else:
            curvature = curvature_operator(
                self.second_order_mode, self.model, self.loss, data, block_params
            )
        preconditioner = None
        if self.preconditioner is not None:
            preconditioner = copy.deepcopy(self.preconditioner).fit(curvature, regularization)
        op = CgOperator(
            curvature,
            regularization,
            rtol=self.rtol,
            atol=self.atol,
            maxiter=self.maxiter,
            progress=self.progress,
            preconditioner=preconditioner,
            use_block_cg=self.solve_simultaneously,
            warn_on_max_iteration=self.warn_on_max_iteration,
        )
        return TorchOperatorGradientComposition(
            op, self._gradient_provider(self.loss, block_name, block_params)
        )


class LissaInfluence(TorchComposableInfluence):
    r"""Influence through LiSSA, a stochastic iteration using one mini-batch per step.

    For each block, $(C_b + \lambda_b I)^{-1} g$ is approximated by the iteration

    $$
    h_{t+1} = g + (1 - d)\, h_t - \frac{(C_{b, t} + \lambda_b I)\, h_t}{s}, \qquad
    (C_b + \lambda_b I)^{-1} g \approx \frac{h_T}{s},
    $$

    with $C_{b,t}$ the curvature (Hessian or Gauss-Newton matrix) of the $t$-th mini-batch of
    the training loader, iterated repeatedly. See
    [LissaOperator][influx.torch.iterative.LissaOperator] for the choice of the scale $s$ (it
    must exceed half the largest batch eigenvalue; `scale="auto"` estimates it) and the
    divergence check. Each step costs one Hessian-vector product on one batch, so LiSSA suits
    large data sets; its result fluctuates with the batch size, and it needs many steps when
    $\lambda$ is small compared with the largest eigenvalue.

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction.
        regularization: $\lambda \ge 0$, a float for all blocks or a dict keyed by block name.
        maxiter: maximum number of iterations (batches).
        dampen: the dampening $d \in [0, 1)$.
        scale: the scale $s > 0$, or `"auto"`.
        rtol: tolerance on the relative change between iterations, $> 0$.
        progress: show a progress bar over the iterations.
        warn_on_max_iteration: log a warning with the achieved relative change when `rtol` is
            not reached within `maxiter` iterations; if False, log it at debug level.
        block_structure: a [BlockMode][influx.torch.util.BlockMode] or an
            `OrderedDict[str, List[str]]` mapping block names to parameter names.
        second_order_mode: the curvature, `SecondOrderMode.HESSIAN` or `GAUSS_NEWTON`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType = None,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: Union[float, str] = 10.0,
        rtol: float = 1e-4,
        progress: bool = False,
        warn_on_max_iteration: bool = True,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
    ):
        super().__init__(model, block_structure, regularization)
        _validate_lissa_settings(maxiter, dampen, scale, rtol)
        self.loss = loss
        self.maxiter = maxiter
        self.dampen = dampen
        self.scale = scale
        self.rtol = rtol
        self.progress = progress
        self.warn_on_max_iteration = warn_on_max_iteration
        self.second_order_mode = _check_second_order_mode(second_order_mode)

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        batch_operation: BatchOperation
        if self.second_order_mode is SecondOrderMode.GAUSS_NEWTON:
            batch_operation = GaussNewtonBatchOperation(self.model, self.loss, block_params)
        else:
            batch_operation = HessianBatchOperation(self.model, self.loss, block_params)
        op = LissaOperator(
            batch_operation,
            data,
            regularization,
            maxiter=self.maxiter,
            dampen=self.dampen,
            scale=self.scale,
            rtol=self.rtol,
            progress=self.progress,
            warn_on_max_iteration=self.warn_on_max_iteration,
        )
        return TorchOperatorGradientComposition(
            op, self._gradient_provider(self.loss, block_name, block_params)
        )
