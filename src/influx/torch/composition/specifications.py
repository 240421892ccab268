r"""The three parts of a block: gradients × curvature × inverse method.

An influence model splits the model's parameters into blocks; for each block it needs

* a **curvature** $C_b$ ([Curvature][influx.torch.composition.specifications.Curvature]): the Hessian, the
  empirical Fisher (`GAUSS_NEWTON`), the generalized Gauss-Newton matrix $J^\top H_{out} J$, or
  a Kronecker factorisation (K-FAC / EK-FAC) of the empirical Fisher;
* an **inverse method** ([Solver][influx.torch.composition.specifications.Solver]) that turns $C_b$ and
  $\lambda_b$ into an operator $A_b \approx (C_b + \lambda_b I)^{-1}$: a direct solve, CG with
  any preconditioner, LiSSA, a low-rank approximation (Lanczos / Nyström), the inverse harmonic
  mean, or the exact inverse of a factored curvature;
* the block's per-sample **gradients**
  ([TorchGradientProvider][influx.torch.gradients.provider.TorchGradientProvider]).

Any valid pair of curvature and solver composes: CG on the generalized Gauss-Newton, Lanczos on
the EK-FAC curvature, ... A pair that cannot work (LiSSA without mini-batches, the inverse
harmonic mean of anything but the empirical Fisher, the factored inverse of an unfactored
curvature) raises a `TypeError` naming both when the model is fitted.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from ...errors import NonConvergenceError, NonFiniteCurvatureError
from ..autodiff.derivatives import LossOrTask
from ..curvature.batch_operation import GaussNewtonBatchOperation
from ..curvature.operators import (
    AveragingBatchOperator,
    PrecomputedGaussNewtonOperator,
    SecondOrderMode,
    check_second_order_mode,
    curvature_operator,
)
from ..curvature.tensor_operator import TensorOperator
from ..data.blocks import BlockStructure, block_parameters
from ..data.validation import (
    check_nonconvergence_policy,
    check_seed,
    make_generator,
    require_positive_regularization,
    validate_cg_settings,
    validate_lissa_settings,
)
from ..inverse.cg import CgOperator
from ..inverse.direct import DirectSolveOperator
from ..inverse.inverse_harmonic_mean import InverseHarmonicMeanOperator
from ..inverse.lissa import LissaOperator
from ..inverse.low_rank import (
    LowRankApproximation,
    LowRankOperator,
    default_krylov_dimension,
    lanczos_low_rank,
    nystroem_low_rank,
    validate_rank,
)
from ..inverse.preconditioner import Preconditioner, check_preconditioner
from ..kfac.factors import fit_kronecker_curvature, validate_fisher
from ..kfac.layers import find_layers
from ..kfac.operators import KroneckerFactoredCurvature, KroneckerFactoredOperator

LISSA_DEFAULTS: Dict[str, Any] = dict(
    maxiter=1000,
    dampen=0.0,
    scale=10.0,
    rtol=1e-4,
    progress=False,
    warn_on_max_iteration=True,
    on_nonconvergence="warn",
    seed=None,
)
"""LiSSA's settings and their defaults (those of [LissaOperator][influx.torch.inverse.lissa.LissaOperator])."""

__all__ = [
    "Curvature",
    "ModeCurvature",
    "KroneckerCurvature",
    "Solver",
    "LowRankSolver",
    "DirectSolver",
    "CgSolver",
    "LissaSolver",
    "ArnoldiSolver",
    "NystroemSolver",
    "InverseHarmonicMeanSolver",
    "FactoredSolver",
]

logger = logging.getLogger(__name__)


class Curvature(ABC):
    """Which curvature each block inverts, and how it is fitted to the training data."""

    def blocks(
        self, model: torch.nn.Module, block_structure: BlockStructure
    ) -> "OrderedDict[str, Dict[str, torch.nn.Parameter]]":
        """The blocks of parameters this curvature is defined on (by default: as the block
        structure says)."""
        return block_parameters(model, block_structure)

    @abstractmethod
    def fit(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        data: Iterable,
        blocks: "OrderedDict[str, Dict[str, torch.nn.Parameter]]",
    ) -> "OrderedDict[str, TensorOperator]":
        """The curvature operator of every block (without regularization)."""


class ModeCurvature(Curvature):
    r"""The curvature named by a [SecondOrderMode][influx.torch.curvature.operators.SecondOrderMode],
    averaged over the training data by points.

    Its products go through the data on every application (matrix-free), except with
    `precompute_grad=True` for `GAUSS_NEWTON`: the per-sample gradients of each block are then
    computed once ($n \times P_b$ numbers in memory) and every product is two matrix products.

    Args:
        mode: `HESSIAN`, `GAUSS_NEWTON` or `GENERALIZED_GAUSS_NEWTON`.
        precompute_grad: keep the per-sample gradients of `GAUSS_NEWTON` in memory.
        progress: show a progress bar over the batches whenever the curvature goes through
            the data (the dense matrix of the direct method, the Nyström sketch, ...).
    """

    def __init__(
        self, mode: SecondOrderMode, precompute_grad: bool = False, progress: bool = False
    ):
        self.mode = check_second_order_mode(mode)
        self.precompute_grad = bool(precompute_grad)
        self.progress = bool(progress)

    def fit(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        data: Iterable,
        blocks: "OrderedDict[str, Dict[str, torch.nn.Parameter]]",
    ) -> "OrderedDict[str, TensorOperator]":
        result: "OrderedDict[str, TensorOperator]" = OrderedDict()
        for name, params in blocks.items():
            if self.precompute_grad and self.mode is SecondOrderMode.GAUSS_NEWTON:
                operation = GaussNewtonBatchOperation(model, loss, params)
                result[name] = PrecomputedGaussNewtonOperator(operation, data)
            else:
                op = curvature_operator(self.mode, model, loss, data, params)  # type: ignore[arg-type]
                op.progress = self.progress
                result[name] = op
        return result


class KroneckerCurvature(Curvature):
    r"""The Kronecker-factored empirical (or sampled) Fisher of every `Linear` / `Conv2d` layer.

    Each layer is one block. One pass over the data collects the factors $A$ and $G$ and
    eigendecomposes them; with `update_diagonal` the eigenvalues are refitted in the Kronecker
    eigenbasis (EK-FAC), reusing the first pass's signals if they fit in `max_cache_mb` (with
    the training labels; with `fisher="sampled"` the refit draws fresh labels). See
    [influx.torch.kfac.factors][influx.torch.kfac.factors].

    Args:
        update_diagonal: refit the eigenvalues (EK-FAC) instead of K-FAC's products.
        fisher: `"empirical"` (training labels) or `"sampled"` (labels drawn from the model).
        layers: the module names of the layers to use; None means every trainable module.
        seed: seed of the label sampling for `fisher="sampled"`.
        max_cache_mb: memory budget of the first pass's signals for the refit (empirical
            Fisher only).
        progress: show progress bars over the batches.
    """

    def __init__(
        self,
        update_diagonal: bool = True,
        fisher: str = "empirical",
        layers: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        max_cache_mb: float = 256.0,
        progress: bool = False,
    ):
        if not isinstance(update_diagonal, bool):
            raise TypeError(
                "Parameter 'update_diagonal' must be a bool, got "
                f"{type(update_diagonal).__name__}: pass the loss by keyword (loss=...)."
            )
        if isinstance(max_cache_mb, bool) or not isinstance(max_cache_mb, (int, float)):
            raise TypeError(
                f"Parameter 'max_cache_mb' must be a number, got {type(max_cache_mb).__name__}."
            )
        if not max_cache_mb >= 0:
            raise ValueError(f"Parameter 'max_cache_mb' must be >= 0, got {max_cache_mb}.")
        self.update_diagonal = update_diagonal
        self.fisher = fisher
        self.layers = None if layers is None else list(layers)
        self.seed = seed
        self.max_cache_mb = max_cache_mb
        self.progress = progress

    @property
    def method(self) -> str:
        """`"ekfac"` with `update_diagonal`, else `"kfac"`."""
        return "ekfac" if self.update_diagonal else "kfac"

    def blocks(
        self, model: torch.nn.Module, block_structure: BlockStructure
    ) -> "OrderedDict[str, Dict[str, torch.nn.Parameter]]":
        specs = find_layers(model, self.layers)
        structure = OrderedDict((name, spec.parameter_names) for name, spec in specs.items())
        return block_parameters(model, structure)

    def fit(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        data: Iterable,
        blocks: "OrderedDict[str, Dict[str, torch.nn.Parameter]]",
    ) -> "OrderedDict[str, TensorOperator]":
        fisher = validate_fisher(self.fisher, loss)
        specs = find_layers(model, self.layers)
        device = next(iter(specs.values())).device
        generator = None
        if fisher == "sampled" and self.seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.seed)
        factors, bases, eigenvalues = fit_kronecker_curvature(
            model,
            specs,
            data,  # type: ignore[arg-type]
            loss,
            fisher,
            self.update_diagonal,
            generator,
            self.progress,
            self.max_cache_mb,
        )
        dtype = next(iter(blocks[next(iter(blocks))].values())).dtype
        result: "OrderedDict[str, TensorOperator]" = OrderedDict()
        for name in blocks:
            spec, basis = specs[name], bases[name]
            result[name] = KroneckerFactoredCurvature(
                basis.input_eigenvectors.to(device),
                basis.output_eigenvectors.to(device),
                eigenvalues[name].to(device),
                spec.weight_name,
                spec.weight_shape,
                spec.bias_name,
                method=self.method,
                dtype=dtype,
                layer_name=name,
                factors=factors[name],
                eigenbasis=basis,
            )
        return result


def _unsupported(solver: "Solver", curvature: TensorOperator, needs: str) -> TypeError:
    return TypeError(
        f"{type(solver).__name__} cannot invert a {type(curvature).__name__}: it needs {needs}."
    )


class Solver(ABC):
    r"""An inverse method: turns a block's curvature $C_b$ and $\lambda_b$ into an operator
    $A_b \approx (C_b + \lambda_b I)^{-1}$."""

    positive_regularization_reason: Optional[str] = None
    """If set, every block needs $\\lambda > 0$, for this reason."""

    def check_regularization(self, regularization: object, block_names: List[str]) -> None:
        """Raise a ValueError if a block's regularization is one this method cannot take."""
        if self.positive_regularization_reason is not None:
            require_positive_regularization(
                regularization,  # type: ignore[arg-type]
                block_names,
                self.positive_regularization_reason,
            )

    def check_block_sizes(self, sizes: Dict[str, int]) -> None:  # noqa: B027 - optional hook
        """Raise a ValueError if the method cannot work on blocks of these sizes."""

    @abstractmethod
    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        """The inverse operator of one block."""


class DirectSolver(Solver):
    """The dense curvature of each block, factorised once
    ([DirectSolveOperator][influx.torch.inverse.direct.DirectSolveOperator])."""

    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        to_dense = getattr(curvature, "to_dense", None)
        if to_dense is None:
            raise _unsupported(self, curvature, "a curvature with a dense matrix (to_dense)")
        try:
            op = DirectSolveOperator(to_dense(), regularization=regularization)
        except NonFiniteCurvatureError as error:
            error.block = block_name  # type: ignore[attr-defined]
            raise
        logger.debug(
            "Block %r: %d parameters, %s factorisation.",
            block_name,
            op.input_size,
            op.factorization,
        )
        return op


class CgSolver(Solver):
    """Conjugate gradient on $C_b + \\lambda_b I$ ([CgOperator][influx.torch.inverse.cg.CgOperator]),
    with a copy of `preconditioner` fitted to every block; see the arguments of
    [CgInfluence][influx.torch.models.cg.CgInfluence]."""

    def __init__(
        self,
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
        maxiter: Optional[int] = None,
        progress: bool = False,
        preconditioner: Optional[Preconditioner] = None,
        solve_simultaneously: bool = False,
        warn_on_max_iteration: bool = True,
        on_nonconvergence: str = "warn",
    ):
        validate_cg_settings(rtol, atol, maxiter)
        check_preconditioner(preconditioner)
        self.preconditioner = preconditioner
        self.options = dict(
            rtol=rtol,
            atol=atol,
            maxiter=maxiter,
            progress=progress,
            use_block_cg=solve_simultaneously,
            warn_on_max_iteration=warn_on_max_iteration,
            on_nonconvergence=check_nonconvergence_policy(on_nonconvergence),
        )

    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        preconditioner = None
        if self.preconditioner is not None:
            preconditioner = copy.deepcopy(self.preconditioner).fit(curvature, regularization)
        return CgOperator(
            curvature,
            regularization,
            preconditioner=preconditioner,
            **self.options,  # type: ignore[arg-type]
        )


class LissaSolver(Solver):
    """LiSSA, one mini-batch of the curvature per step
    ([LissaOperator][influx.torch.inverse.lissa.LissaOperator]); see the arguments of
    [LissaInfluence][influx.torch.models.lissa.LissaInfluence]."""

    def __init__(self, **options: Any):
        settings = {**LISSA_DEFAULTS, **options}
        unknown = sorted(set(settings) - set(LISSA_DEFAULTS))
        if unknown:
            raise TypeError(
                f"Unexpected LiSSA parameters {unknown}; valid ones are {sorted(LISSA_DEFAULTS)}."
            )
        validate_lissa_settings(
            settings["maxiter"], settings["dampen"], settings["scale"], settings["rtol"]
        )
        check_nonconvergence_policy(settings["on_nonconvergence"])
        check_seed(settings["seed"])
        self.options = settings

    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        if not isinstance(curvature, AveragingBatchOperator):
            raise _unsupported(self, curvature, "a curvature averaged over mini-batches")
        return LissaOperator(
            curvature.batch_operation, curvature.dataloader, regularization, **self.options
        )


class LowRankSolver(Solver):
    """A low-rank approximation $V D V^\\top$ of the curvature of rank `rank`, inverted as a
    [LowRankOperator][influx.torch.inverse.low_rank.LowRankOperator]."""

    rank: int

    def check_block_sizes(self, sizes: Dict[str, int]) -> None:
        for name, size in sizes.items():
            validate_rank(self.rank, size, name)

    @abstractmethod
    def _approximate(self, curvature: TensorOperator) -> LowRankApproximation:
        """The low-rank approximation of one block's curvature."""

    def _low_rank(
        self,
        curvature: TensorOperator,
        regularization: Optional[float],
        block_name: str,
        exact: bool,
    ) -> LowRankOperator:
        try:
            approximation = self._approximate(curvature)
        except ValueError as error:
            raise ValueError(f"Block {block_name!r}: {error}") from error
        op = LowRankOperator(approximation.representation, regularization, exact=exact)
        op.diagnostics = approximation.diagnostics
        return op


class ArnoldiSolver(LowRankSolver):
    """The top eigenpairs of the curvature by thick-restart Lanczos, inverted as a low-rank
    operator ([LowRankOperator][influx.torch.inverse.low_rank.LowRankOperator]); see the arguments of
    [ArnoldiInfluence][influx.torch.models.low_rank.ArnoldiInfluence]."""

    def __init__(
        self,
        rank: int = 10,
        krylov_dimension: Optional[int] = None,
        tol: float = 1e-6,
        max_iter: Optional[int] = None,
        use_woodbury: bool = False,
        progress: bool = False,
        on_nonconvergence: str = "warn",
        seed: Optional[int] = None,
    ):
        check_seed(seed)
        self.on_nonconvergence = check_nonconvergence_policy(on_nonconvergence)
        self.seed = seed
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
        self.use_woodbury = use_woodbury
        self.progress = progress
        if use_woodbury:
            self.positive_regularization_reason = "use_woodbury=True"

    def _approximate(self, curvature: TensorOperator) -> LowRankApproximation:
        size = curvature.input_size
        krylov = (
            default_krylov_dimension(self.rank, size)
            if self.krylov_dimension is None
            else min(self.krylov_dimension, size)
        )
        return lanczos_low_rank(
            curvature,
            self.rank,
            krylov_dimension=krylov,
            tol=self.tol,
            max_iter=self.max_iter,
            progress=self.progress,
            generator=make_generator(getattr(self, "seed", None), curvature.device),
        )

    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        op = self._low_rank(curvature, regularization, block_name, exact=self.use_woodbury)
        diagnostics = op.diagnostics
        if (
            getattr(self, "on_nonconvergence", "warn") == "raise"
            and diagnostics is not None
            and not diagnostics.converged
        ):
            raise NonConvergenceError(
                f"Block {block_name!r}: Lanczos did not converge to tol={self.tol:g} "
                f"(largest relative eigen-residual {diagnostics.residual}); increase "
                "'max_iter' or 'krylov_dimension', or lower 'rank'.",
                diagnostics,
            )
        return op


class NystroemSolver(LowRankSolver):
    """A randomized Nyström sketch of the curvature, inverted exactly by Woodbury
    ([LowRankOperator][influx.torch.inverse.low_rank.LowRankOperator]); see
    [NystroemSketchInfluence][influx.torch.models.low_rank.NystroemSketchInfluence]."""

    positive_regularization_reason = "the Nyström sketch is inverted by Woodbury"

    def __init__(self, rank: int, seed: Optional[int] = None):
        check_seed(seed)
        self.rank = rank
        self.seed = seed

    def _approximate(self, curvature: TensorOperator) -> LowRankApproximation:
        return nystroem_low_rank(curvature, self.rank, make_generator(self.seed, curvature.device))

    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        op = self._low_rank(curvature, regularization, block_name, exact=True)
        if op.diagnostics is not None and op.diagnostics.details["negative_curvature"]:
            logger.warning(
                "Block %r: the curvature has negative eigenvalues, the Nyström sketch keeps "
                "only its positive part and cannot be exact.",
                block_name,
            )
        return op


class InverseHarmonicMeanSolver(Solver):
    """The inverse harmonic mean of the rank-one terms of the empirical Fisher (DataInf,
    [InverseHarmonicMeanOperator][influx.torch.inverse.inverse_harmonic_mean.InverseHarmonicMeanOperator])."""

    positive_regularization_reason = "each rank-one term needs g g^T + λI invertible"

    def __init__(self, progress: bool = False):
        self.progress = progress

    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        operation = getattr(curvature, "batch_operation", None)
        if not (
            isinstance(curvature, AveragingBatchOperator)
            and type(operation) is GaussNewtonBatchOperation
        ):
            raise _unsupported(
                self, curvature, "the empirical Fisher (SecondOrderMode.GAUSS_NEWTON) over data"
            )
        assert isinstance(operation, GaussNewtonBatchOperation)
        return InverseHarmonicMeanOperator(
            operation.model,
            operation.loss,
            curvature.dataloader,
            regularization,  # type: ignore[arg-type]
            operation.params,  # type: ignore[arg-type]
            progress=self.progress,
        )


class FactoredSolver(Solver):
    """The exact inverse of a Kronecker-factored curvature in its eigenbasis
    ([KroneckerFactoredOperator][influx.torch.kfac.operators.KroneckerFactoredOperator])."""

    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        if not isinstance(curvature, KroneckerFactoredCurvature):
            raise _unsupported(self, curvature, "a Kronecker-factored curvature")
        return KroneckerFactoredOperator.from_curvature(curvature, regularization)
