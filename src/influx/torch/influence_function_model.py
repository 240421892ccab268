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
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from ..types import InfluenceMode
from .base import (
    TensorOperator,
    TorchBlockMapper,
    TorchComposableInfluence,
    TorchOperatorGradientComposition,
)
from .batch_operation import BatchOperation, GaussNewtonBatchOperation, HessianBatchOperation
from .compat import TorchInfluenceFunctionModel
from .functional import LossFunction
from .inverse_harmonic_mean import InverseHarmonicMeanOperator
from .iterative import (
    CgOperator,
    LissaOperator,
    _validate_cg_settings,
    _validate_lissa_settings,
)
from .kfac import (
    KroneckerFactoredOperator,
    SignalCache,
    collect_kronecker_factors,
    eigendecompose_factors,
    find_layers,
    refit_eigenvalues,
    validate_fisher,
)
from .low_rank import (
    LowRankOperator,
    default_krylov_dimension,
    lanczos_low_rank,
    nystroem_low_rank,
    validate_rank,
)
from .operator import DirectSolveOperator, SecondOrderMode, curvature_operator, iterate_batches
from .preconditioner import Preconditioner, check_preconditioner
from .util import (
    BlockMode,
    BlockStructure,
    RegularizationType,
    regularization_by_block,
    validate_regularization,
)

__all__ = [
    "DirectInfluence",
    "CgInfluence",
    "LissaInfluence",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
    "InverseHarmonicMeanInfluence",
    "EkfacInfluence",
    "TorchInfluenceFunctionModel",
]

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
        check_preconditioner(preconditioner)
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


def _require_positive_regularization(
    regularization: RegularizationType, block_names: List[str], reason: str
) -> None:
    """Raise a ValueError naming 'regularization' unless every block gets $\\lambda > 0$."""
    by_block = regularization_by_block(regularization, block_names)
    bad = {name: value for name, value in by_block.items() if value is None or value <= 0}
    if bad:
        if isinstance(regularization, Mapping):
            given = ", ".join(f"{name!r}: {value}" for name, value in bad.items())
            given = f"{{{given}}}"
        else:
            given = repr(regularization)
        raise ValueError(
            f"Parameter 'regularization' must be positive for every block ({reason}), got {given}."
        )


def _block_sizes(model: TorchComposableInfluence) -> Dict[str, int]:
    return {name: sum(p.numel() for p in params.values()) for name, params in model._blocks.items()}


class ArnoldiInfluence(TorchComposableInfluence):
    r"""Influence through the top eigenpairs of the curvature (Lanczos / Arnoldi).

    On `fit`, the `rank` eigenpairs of largest magnitude of each block's curvature $C_b$
    (Hessian or Gauss-Newton matrix of the mean training loss) are computed by the
    thick-restart Lanczos method ([lanczos_eigenpairs][influx.torch.low_rank.lanczos_eigenpairs],
    matrix-free: only curvature-vector products, on the model's device), giving
    $C_b \approx V D V^\top$. The inverse is then applied by a
    [LowRankOperator][influx.torch.low_rank.LowRankOperator]:

    * `use_woodbury=False` (default): $V (D + \lambda I)^{-1} V^\top$, which ignores the
      directions outside the top eigenspace; the influences are paired through the
      projections $V^\top \nabla_\theta \ell$ (Jacobian-vector products, no per-sample
      gradients are formed);
    * `use_woodbury=True`: the exact inverse of $V D V^\top + \lambda I$ (Woodbury), which
      scales the remaining directions by $1/\lambda$; needs $\lambda > 0$. At `rank` $= P$
      (or when the omitted eigenvalues are zero) it equals the direct method.

    Changing the regularization (`with_regularization`) reuses the eigenpairs. The Lanczos
    run of each block is reported in `solver_diagnostics` (method `"lanczos"`, operator
    applications, largest relative eigen-residual, convergence, eigenvalue range).

    Args:
        model: the trained model.
        loss: the loss function (mean reduction).
        regularization: $\lambda$, a float or a dict keyed by block name; must be positive for
            every block with `use_woodbury=True`.
        rank: the number of eigenpairs per block, in $[1, P_b]$ for every block.
        krylov_dimension: the size of the Lanczos basis; None means
            $\min(P_b, \max(2\,\text{rank} + 1, 20))$. Larger values converge in fewer
            restarts but use $O(m P_b)$ memory. Capped at $P_b$ per block.
        tol: relative tolerance on the eigen-residuals.
        max_iter: the maximum number of Lanczos restarts; None means $10 P_b$.
        eigen_computation_on_gpu: accepted for compatibility and ignored: the eigenpairs are
            always computed in torch on the model's device.
        block_structure: a [BlockMode][influx.torch.util.BlockMode] or a custom structure.
        second_order_mode: `HESSIAN` or `GAUSS_NEWTON`.
        use_woodbury: exact inverse of the low-rank approximation plus $\lambda I$ (True) or
            projected inverse (False).
        progress: show a progress bar over operator applications.

    Example:
        ```python
        model = ArnoldiInfluence(net, F.cross_entropy, 0.01, rank=50).fit(train_loader)
        values = model.influences(x_test, y_test, x_train, y_train)
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType = None,
        rank: int = 10,
        krylov_dimension: Optional[int] = None,
        tol: float = 1e-6,
        max_iter: Optional[int] = None,
        eigen_computation_on_gpu: bool = False,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        use_woodbury: bool = False,
        progress: bool = False,
    ):
        super().__init__(model, block_structure, regularization)
        self.loss = loss
        self.second_order_mode = _check_second_order_mode(second_order_mode)
        for name, size in _block_sizes(self).items():
            validate_rank(rank, size, name)
        if krylov_dimension is not None:
            if isinstance(krylov_dimension, bool) or not isinstance(krylov_dimension, int):
                raise TypeError(
                    "Parameter 'krylov_dimension' must be an int or None, got "
                    f"{type(krylov_dimension).__name__}."
                )
            if krylov_dimension <= rank:
                raise ValueError(
                    f"Parameter 'krylov_dimension' must be larger than rank = {rank}, got "
                    f"{krylov_dimension}."
                )
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"Parameter 'tol' must be a positive number, got {tol!r}.")
        if max_iter is not None and (
            isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0
        ):
            raise ValueError(
                f"Parameter 'max_iter' must be a non-negative int or None, got {max_iter!r}."
            )
        self.rank = rank
        self.krylov_dimension = krylov_dimension
        self.tol = tol
        self.max_iter = max_iter
        self.eigen_computation_on_gpu = eigen_computation_on_gpu
        self.use_woodbury = use_woodbury
        self.progress = progress
        if use_woodbury:
            _require_positive_regularization(regularization, self.block_names, "use_woodbury=True")

    def with_regularization(self, regularization: RegularizationType) -> "ArnoldiInfluence":
        """A copy with another regularization, reusing the eigenpairs of every block."""
        if self.use_woodbury:
            _require_positive_regularization(regularization, self.block_names, "use_woodbury=True")
        return super().with_regularization(regularization)  # type: ignore[return-value]

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        )
        size = curvature.input_size
        rank = min(self.rank, size)
        krylov = (
            default_krylov_dimension(rank, size)
            if self.krylov_dimension is None
            else min(self.krylov_dimension, size)
        )
        try:
            approximation = lanczos_low_rank(
                curvature,
                rank,
                krylov_dimension=krylov,
                tol=self.tol,
                max_iter=self.max_iter,
                progress=self.progress,
            )
        except ValueError as error:
            raise ValueError(f"Block {block_name!r}: {error}") from error
        op = LowRankOperator(approximation.representation, regularization, exact=self.use_woodbury)
        op.diagnostics = approximation.diagnostics
        logger.debug(
            "Block %r: %d parameters, %d eigenpairs in %d operator applications.",
            block_name,
            size,
            rank,
            approximation.diagnostics.iterations,
        )
        return TorchOperatorGradientComposition(
            op, self._gradient_provider(self.loss, block_name, block_params)
        )


class NystroemSketchInfluence(TorchComposableInfluence):
    r"""Influence through a randomized Nyström sketch of the curvature.

    On `fit`, each block's curvature is applied once to `rank` random orthonormal vectors
    $Q$, and $C_b \approx (C_b Q)(Q^\top C_b Q)^{+}(C_b Q)^\top = V D V^\top$
    ([randomized_nystroem_approximation][influx.torch.functional.randomized_nystroem_approximation]).
    The inverse of $V D V^\top + \lambda I$ is applied exactly by the Woodbury formula
    ([LowRankOperator][influx.torch.low_rank.LowRankOperator]), so $\lambda > 0$ is required.

    The sketch assumes a positive semi-definite curvature: it is exact at `rank` $= P_b$ for
    the Gauss-Newton matrix or the Hessian of a convex model. If the sketch finds negative
    curvature (an indefinite Hessian, e.g. of a network), a warning is logged, the negative
    part is dropped and the result cannot match the direct method; prefer
    `second_order_mode=SecondOrderMode.GAUSS_NEWTON` for non-convex models. Changing the
    regularization reuses the sketch.

    Args:
        model: the trained model.
        loss: the loss function (mean reduction).
        regularization: $\lambda > 0$, a float or a dict keyed by block name (every block).
        rank: the sketch size per block, in $[1, P_b]$ for every block.
        block_structure: a [BlockMode][influx.torch.util.BlockMode] or a custom structure.
        second_order_mode: `HESSIAN` or `GAUSS_NEWTON`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType,
        rank: int,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
    ):
        super().__init__(model, block_structure, regularization)
        self.loss = loss
        self.second_order_mode = _check_second_order_mode(second_order_mode)
        for name, size in _block_sizes(self).items():
            validate_rank(rank, size, name)
        _require_positive_regularization(
            regularization, self.block_names, "the Nyström sketch is inverted by Woodbury"
        )
        self.rank = rank

    def with_regularization(self, regularization: RegularizationType) -> "NystroemSketchInfluence":
        """A copy with another regularization, reusing the sketch of every block."""
        _require_positive_regularization(
            regularization, self.block_names, "the Nyström sketch is inverted by Woodbury"
        )
        return super().with_regularization(regularization)  # type: ignore[return-value]

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        )
        try:
            approximation = nystroem_low_rank(curvature, min(self.rank, curvature.input_size))
        except ValueError as error:
            raise ValueError(f"Block {block_name!r}: {error}") from error
        if approximation.diagnostics.details["negative_curvature"]:
            logger.warning(
                "Block %r: the %s has negative curvature, the Nyström sketch keeps only its "
                "positive part and cannot be exact.",
                block_name,
                self.second_order_mode.name,
            )
        op = LowRankOperator(approximation.representation, regularization, exact=True)
        op.diagnostics = approximation.diagnostics
        return TorchOperatorGradientComposition(
            op, self._gradient_provider(self.loss, block_name, block_params)
        )


class InverseHarmonicMeanInfluence(TorchComposableInfluence):
    r"""Influence with the inverse harmonic mean of rank-one curvatures (DataInf).

    Replaces $(G_b + \lambda I)^{-1}$, the inverse of the damped Gauss-Newton matrix of each
    block, by the mean of the inverses of its rank-one terms,

    $$
    \frac{1}{n}\sum_{i=1}^n \left(g_i g_i^\top + \lambda I\right)^{-1}, \qquad
    g_i = \nabla_{\theta_b} \ell(x_i, y_i),
    $$

    each applied in closed form (Sherman–Morrison), see
    [InverseHarmonicMeanOperator][influx.torch.inverse_harmonic_mean.InverseHarmonicMeanOperator].
    It is an approximation that does not converge to the direct method; its error is small
    when $\lambda$ is large compared to $\|g_i\|^2$ and grows with the block size, so it is
    usually used with a layer-wise block structure. `fit` computes nothing: every
    `influence_factors` / `influences` call makes one pass over the training data, and
    `with_regularization` is free.

    Args:
        model: the trained model.
        loss: the loss function (mean reduction).
        regularization: $\lambda > 0$, a float or a dict keyed by block name (every block).
        block_structure: a [BlockMode][influx.torch.util.BlockMode] or a custom structure.
        second_order_mode: only `SecondOrderMode.GAUSS_NEWTON`: the method is defined through
            the rank-one terms of the Gauss-Newton matrix; `HESSIAN` raises a ValueError.
        progress: show a progress bar over the training batches.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.GAUSS_NEWTON,
        progress: bool = False,
    ):
        super().__init__(model, block_structure, regularization)
        self.loss = loss
        mode = _check_second_order_mode(second_order_mode)
        if mode is not SecondOrderMode.GAUSS_NEWTON:
            raise ValueError(
                "Parameter 'second_order_mode' must be SecondOrderMode.GAUSS_NEWTON for "
                "InverseHarmonicMeanInfluence (it inverts the rank-one terms of the "
                f"Gauss-Newton matrix), got {mode!r}."
            )
        self.second_order_mode = mode
        _require_positive_regularization(
            regularization, self.block_names, "each rank-one term needs g g^T + λI invertible"
        )
        self.progress = progress

    def with_regularization(
        self, regularization: RegularizationType
    ) -> "InverseHarmonicMeanInfluence":
        """A copy with another regularization (nothing to recompute)."""
        _require_positive_regularization(
            regularization, self.block_names, "each rank-one term needs g g^T + λI invertible"
        )
        return super().with_regularization(regularization)  # type: ignore[return-value]

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        op = InverseHarmonicMeanOperator(
            self.model,
            self.loss,
            data,
            regularization,  # type: ignore[arg-type]
            block_params,
            progress=self.progress,
        )
        return TorchOperatorGradientComposition(
            op, self._gradient_provider(self.loss, block_name, block_params)
        )


class EkfacInfluence(TorchComposableInfluence):
    r"""Influence through the Kronecker-factored curvature of each layer (K-FAC or EK-FAC).

    Every trainable `nn.Linear` and `nn.Conv2d` layer is one block (named after its module;
    a model that is itself a single layer gives the block `"model"`). On `fit`, one pass over
    the data collects, per layer, the input covariance $A$ and the output-gradient covariance
    $G$ with module hooks, and eigendecomposes both in float64; with `update_diagonal=True`
    a second pass refits the eigenvalues in the Kronecker eigenbasis (EK-FAC). See
    [influx.torch.kfac][influx.torch.kfac] for the formulas. Influence factors are

    $$
    (F_b + \lambda I)^{-1} \nabla_{\theta_b}\ell(z'), \qquad
    F_b \approx (Q_G \otimes Q_A)\, \mathrm{diag}(s)\, (Q_G \otimes Q_A)^\top ,
    $$

    applied by rotating into the eigenbasis, dividing by $s + \lambda$ and rotating back
    ([KroneckerFactoredOperator][influx.torch.kfac.KroneckerFactoredOperator]), never forming a
    $P_b \times P_b$ matrix. Influences sum over layers; the curvature is block-diagonal
    across layers.

    **Which curvature.** By default (`fisher="empirical"`) the gradient signal uses the
    training labels, so $F$ approximates the *empirical Fisher*
    $\frac{1}{n}\sum_i \nabla_\theta\ell_i\nabla_\theta\ell_i^\top$, the matrix that
    [DirectInfluence][influx.torch.influence_function_model.DirectInfluence] uses with
    `second_order_mode=SecondOrderMode.GAUSS_NEWTON`. With `fisher="sampled"` (cross-entropy
    only) labels are drawn from the model's predictive distribution and $F$ approximates the
    *true Fisher* (the generalised Gauss-Newton matrix of the cross-entropy).

    **Losses.** Any loss with mean reduction over samples whose per-sample gradient is the
    batch size times the gradient of the batch loss: cross-entropy (the default) and MSE are
    tested. Layers must process samples independently (no batch-norm in training mode).

    Args:
        model: the trained model. Layers with trainable parameters that are neither `Linear`
            nor `Conv2d` raise
            [NotImplementedLayerRepresentationException][influx.torch.kfac.NotImplementedLayerRepresentationException]
            unless frozen or left out with `layers`.
        update_diagonal: refit the eigenvalues (EK-FAC) instead of using the products of the
            factors' eigenvalues (K-FAC). One more pass over the data.
        hessian_regularization: $\lambda \ge 0$, a float for all layers or a dict keyed by
            layer name.
        progress: show progress bars over the batches.
        loss: the loss `loss(prediction, target)` with mean reduction; default
            `torch.nn.functional.cross_entropy`.
        regularization: an alias of `hessian_regularization`, as in the other models.
        fisher: `"empirical"` (training labels) or `"sampled"` (labels drawn from the model).
        layers: the module names of the layers to use; None means every module with
            trainable parameters. Parameters of other modules are ignored.
        seed: seed of the label sampling for `fisher="sampled"`.
        max_cache_mb: with `update_diagonal`, the layers' inputs and output gradients of the
            first pass are kept in memory up to this size (in MB) so that the refit needs no
            second pass over the data; beyond it, or with 0, the data is iterated twice. The
            results are the same either way (with `fisher="sampled"`, the cached refit reuses
            the labels drawn in the first pass instead of drawing new ones).

    Attributes:
        layer_specs: the layers used, by block name
            ([LayerSpec][influx.torch.kfac.LayerSpec]).
        kronecker_factors: after `fit`, $A$ and $G$ of every layer
            ([KroneckerFactors][influx.torch.kfac.KroneckerFactors], float64).
        eigenbases: after `fit`, their eigendecompositions
            ([KroneckerEigenbasis][influx.torch.kfac.KroneckerEigenbasis]).
        eigenvalues: after `fit`, the eigenvalues $s$ `(m, k)` of every layer in the
            Kronecker eigenbasis (refitted with `update_diagonal`, else
            $\lambda_G \lambda_A^\top$).

    Example:
        ```python
        model = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.01)
        model.fit(train_loader)
        values = model.influences(x_test, y_test, x_train, y_train)  # (n_test, n_train)
        by_layer = model.influences_by_layer(x_test, y_test, x_train, y_train)
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        update_diagonal: bool = False,
        hessian_regularization: RegularizationType = 0.0,
        progress: bool = False,
        *,
        loss: Optional[LossFunction] = None,
        regularization: RegularizationType = None,
        fisher: str = "empirical",
        layers: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        max_cache_mb: float = 256.0,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Parameter 'model' must be a torch.nn.Module, got {type(model).__name__}."
            )
        if regularization is not None:
            if hessian_regularization not in (None, 0.0) and (
                hessian_regularization != regularization
            ):
                raise ValueError(
                    "Parameters 'hessian_regularization' and 'regularization' are aliases: pass "
                    f"one of them, got {hessian_regularization!r} and {regularization!r}."
                )
            hessian_regularization = regularization
        self.loss: LossFunction = torch.nn.functional.cross_entropy if loss is None else loss
        self.fisher = validate_fisher(fisher, self.loss)
        self.layer_specs = find_layers(model, layers)
        structure = OrderedDict(
            (name, spec.parameter_names) for name, spec in self.layer_specs.items()
        )
        super().__init__(model, structure, hessian_regularization)
        self.hessian_regularization = hessian_regularization
        self.update_diagonal = bool(update_diagonal)
        self.progress = progress
        self.seed = seed
        if isinstance(max_cache_mb, bool) or not isinstance(max_cache_mb, (int, float)):
            raise TypeError(
                f"Parameter 'max_cache_mb' must be a number, got {type(max_cache_mb).__name__}."
            )
        if not max_cache_mb >= 0:
            raise ValueError(f"Parameter 'max_cache_mb' must be >= 0, got {max_cache_mb}.")
        self.max_cache_mb = max_cache_mb

    @property
    def method(self) -> str:
        """`"ekfac"` with `update_diagonal`, else `"kfac"`."""
        return "ekfac" if self.update_diagonal else "kfac"

    def _create_block_mapper(self, data: DataLoader) -> TorchBlockMapper:
        generator = None
        if self.fisher == "sampled" and self.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(self.seed)
        specs = self.layer_specs
        cache = SignalCache(self.max_cache_mb * 2**20 if self.update_diagonal else 0)
        self.kronecker_factors = collect_kronecker_factors(
            self.model, specs, data, self.loss, self.fisher, generator, self.progress, cache
        )
        self.eigenbases = {
            name: eigendecompose_factors(factors, name)
            for name, factors in self.kronecker_factors.items()
        }
        if self.update_diagonal:
            self.eigenvalues = refit_eigenvalues(
                self.model,
                specs,
                self.eigenbases,
                data,
                self.loss,
                self.fisher,
                generator,
                self.progress,
                cached=cache if cache.complete else None,
            )
        else:
            self.eigenvalues = {name: b.kfac_eigenvalues for name, b in self.eigenbases.items()}
        return super()._create_block_mapper(data)

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        spec = self.layer_specs[block_name]
        basis = self.eigenbases[block_name]
        op = KroneckerFactoredOperator(
            basis.input_eigenvectors.to(self.device),
            basis.output_eigenvectors.to(self.device),
            self.eigenvalues[block_name].to(self.device),
            regularization,
            spec.weight_name,
            spec.weight_shape,
            spec.bias_name,
            method=self.method,
            dtype=self.dtype,
            layer_name=block_name,
        )
        return TorchOperatorGradientComposition(
            op, self._gradient_provider(self.loss, block_name, block_params)
        )

    def with_regularization(self, regularization: RegularizationType) -> "EkfacInfluence":
        """A copy with another $\\lambda$ reusing the fitted factors and eigenvalues."""
        new = super().with_regularization(regularization)
        assert isinstance(new, EkfacInfluence)
        new.hessian_regularization = regularization
        return new

    def influences_by_layer(
        self,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        x: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "OrderedDict[str, torch.Tensor]":
        """Influences restricted to each layer, by layer name; they sum to `influences`.

        The same as `influences_by_block` (a layer is a block).
        """
        return self.influences_by_block(x_test, y_test, x, y, mode)

    def influence_factors_by_layer(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> "OrderedDict[str, torch.Tensor]":
        r"""$(F_b + \lambda_b I)^{-1} \nabla_{\theta_b} \ell(x_i, y_i)$ by layer name."""
        return self.influence_factors_by_block(x, y)

    def influences_from_factors_by_layer(
        self,
        z_test_factors: "OrderedDict[str, torch.Tensor]",
        x: torch.Tensor,
        y: torch.Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "OrderedDict[str, torch.Tensor]":
        """Influences by layer from factors by layer (see `influence_factors_by_layer`)."""
        return self.influences_from_factors_by_block(z_test_factors, x, y, mode)

    @TorchComposableInfluence.fit_required
    def explore_hessian_regularization(
        self, x: torch.Tensor, y: torch.Tensor, regularization_values: Sequence[float]
    ) -> "Dict[float, OrderedDict[str, torch.Tensor]]":
        r"""Test-by-test influences by layer of `(x, y)` for several values of $\lambda$.

        The per-sample gradients are computed once; each value of $\lambda$ only rescales
        the eigenvalues. Useful to choose $\lambda$ and to see how much the influences depend
        on it.

        Args:
            x: inputs.
            y: targets.
            regularization_values: the values of $\lambda \ge 0$.

        Returns:
            for each value of $\lambda$, the influences `(N, N)` by layer name.
        """
        for value in regularization_values:
            validate_regularization(value, "regularization_values")
        batch = self._create_batch(x, y)
        blocks = self.block_mapper.composable_block_dict
        grads = {name: block.gradient_provider.flat_grads(batch) for name, block in blocks.items()}
        result: Dict[float, OrderedDict[str, torch.Tensor]] = {}
        for value in regularization_values:
            result[value] = OrderedDict(
                (name, block.op.with_regularization(value).apply(grads[name]) @ grads[name].T)
                for name, block in blocks.items()
            )
        return result
