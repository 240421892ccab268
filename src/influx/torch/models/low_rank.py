r"""Influence through low-rank approximations of the curvature: Lanczos and Nyström."""

from __future__ import annotations

from typing import Optional

import torch

from ..autodiff.derivatives import LossFunction
from ..composition.composable import TorchComposableInfluence
from ..composition.curvatures import ModeCurvature
from ..composition.solvers import ArnoldiSolver, NystroemSolver
from ..curvature.operators import SecondOrderMode, check_second_order_mode
from ..data.blocks import BlockMode, BlockStructure
from ..data.validation import RegularizationType

__all__ = ["ArnoldiInfluence", "NystroemSketchInfluence"]


class ArnoldiInfluence(TorchComposableInfluence):
    r"""Influence through the top eigenpairs of the curvature (Lanczos / Arnoldi).

    On `fit`, the `rank` eigenpairs of largest magnitude of each block's curvature $C_b$
    (Hessian or Gauss-Newton matrix of the mean training loss) are computed by the
    thick-restart Lanczos method ([lanczos_eigenpairs][influx.torch.inverse.low_rank_approximation.lanczos_eigenpairs],
    matrix-free: only curvature-vector products, on the model's device), giving
    $C_b \approx V D V^\top$. The inverse is then applied by a
    [LowRankOperator][influx.torch.inverse.low_rank.LowRankOperator]:

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
        regularization: $\lambda$, a number or a dict naming every block; must be positive for
            every block with `use_woodbury=True`. `"auto"` (the default) is
            $\operatorname{tr}(C_b) / P_b$ per block (0.1 of it for Kronecker-factored curvatures) (see
            [influx.torch.inverse.damping][influx.torch.inverse.damping]).
        rank: the number of eigenpairs per block, in $[1, P_b]$ for every block.
        krylov_dimension: the size of the Lanczos basis; None means
            $\min(P_b, \max(2\,\text{rank} + 1, 20))$. Larger values converge in fewer
            restarts but use $O(m P_b)$ memory. Capped at $P_b$ per block.
        tol: relative tolerance on the eigen-residuals.
        max_iter: the maximum number of Lanczos restarts; None means $10 P_b$.
        eigen_computation_on_gpu: accepted for compatibility and ignored: the eigenpairs are
            always computed in torch on the model's device.
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or a custom structure.
        second_order_mode: the curvature (a [SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode]).
        use_woodbury: exact inverse of the low-rank approximation plus $\lambda I$ (True) or
            projected inverse (False).
        progress: show a progress bar over operator applications.
        on_nonconvergence: `"warn"` (log, return the approximate result; pyDVL's behaviour)
            or `"raise"` (raise a [NonConvergenceError][influx.errors.NonConvergenceError]
            carrying the [SolverDiagnostics][influx.types.SolverDiagnostics]) when Lanczos
            does not converge, or when what is inverted (the kept $d_i + \lambda$, and
            $\lambda$ with `use_woodbury`) has a condition number beyond what the compute
            dtype resolves (an [IllConditionedError][influx.errors.IllConditionedError]
            naming the smallest safe $\lambda$).
        seed: seed of the Lanczos start block; the same seed gives the same eigenpairs.
        compute_dtype: the dtype of curvature, factorisations and solves; None means float32
            for a float16 / bfloat16 model and the model's dtype otherwise (see
            [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]).

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
        regularization: RegularizationType = "auto",
        rank: int = 10,
        krylov_dimension: Optional[int] = None,
        tol: float = 1e-6,
        max_iter: Optional[int] = None,
        eigen_computation_on_gpu: bool = False,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        use_woodbury: bool = False,
        progress: bool = False,
        on_nonconvergence: str = "warn",
        seed: Optional[int] = None,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        self.second_order_mode = check_second_order_mode(second_order_mode)
        curvature = ModeCurvature(self.second_order_mode)
        solver = ArnoldiSolver(
            rank,
            krylov_dimension,
            tol,
            max_iter,
            use_woodbury,
            progress,
            on_nonconvergence=on_nonconvergence,
            seed=seed,
        )
        self._compose(
            model, loss, curvature, solver, block_structure, regularization, compute_dtype
        )


class NystroemSketchInfluence(TorchComposableInfluence):
    r"""Influence through a randomized Nyström sketch of the curvature.

    On `fit`, each block's curvature is applied once to `rank` random orthonormal vectors
    $Q$, and $C_b \approx (C_b Q)(Q^\top C_b Q)^{+}(C_b Q)^\top = V D V^\top$
    ([randomized_nystroem_approximation][influx.torch.inverse.sketch.randomized_nystroem_approximation]).
    The inverse of $V D V^\top + \lambda I$ is applied exactly by the Woodbury formula
    ([LowRankOperator][influx.torch.inverse.low_rank.LowRankOperator]), so $\lambda > 0$ is required.

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
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or a custom structure.
        second_order_mode: the curvature (a [SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode]).
        seed: seed of the random sketch; the same seed gives the same sketch.
        progress: show a progress bar over the batches while the sketch is computed.
        compute_dtype: the dtype of curvature, factorisations and solves; None means float32
            for a float16 / bfloat16 model and the model's dtype otherwise (see
            [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]).
        on_nonconvergence: `"warn"` (default) or `"raise"` (an
            [IllConditionedError][influx.errors.IllConditionedError] at `fit`) when
            $V D V^\top + \lambda I$ (eigenvalues $d_i + \lambda$ and $\lambda$) has a condition
            number beyond what the compute dtype resolves: a $\lambda$ too small for the
            sketch's scale.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType,
        rank: int,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        seed: Optional[int] = None,
        progress: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
        on_nonconvergence: str = "warn",
    ):
        self.second_order_mode = check_second_order_mode(second_order_mode)
        curvature = ModeCurvature(self.second_order_mode, progress=progress)
        solver = NystroemSolver(rank, seed, on_nonconvergence)
        if on_nonconvergence == "warn":  # the default: fits saved before it existed load
            self._settings.pop("on_nonconvergence", None)
        self._compose(
            model, loss, curvature, solver, block_structure, regularization, compute_dtype
        )
