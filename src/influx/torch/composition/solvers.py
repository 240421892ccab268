r"""Solver specifications: the inverse method that turns $C_b$ and $\lambda_b$ into
$A_b \approx (C_b + \lambda_b I)^{-1}$.

A direct solve, CG with any preconditioner, LiSSA, a low-rank approximation (Lanczos /
Nyström), the inverse harmonic mean, or the exact inverse of a factored curvature. A solver
checks that it can invert the curvature it is given and raises a `TypeError` naming both
otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Union

from ...errors import NonConvergenceError, NonFiniteCurvatureError
from ...types import SolverDiagnostics
from ..curvature.batch_operation import GaussNewtonBatchOperation
from ..curvature.operators import (
    AveragingBatchOperator,
)
from ..curvature.tensor_operator import TensorOperator
from ..data.regularization import AUTO_REGULARIZATION, require_positive_regularization
from ..data.validation import (
    check_nonconvergence_policy,
    check_seed,
    make_generator,
    validate_cg_settings,
    validate_lissa_settings,
)
from ..inverse.cg import CgOperator
from ..inverse.damping import auto_regularization, auto_regularization_of_matrix
from ..inverse.direct import DirectSolveOperator
from ..inverse.inverse_harmonic_mean import InverseHarmonicMeanOperator
from ..inverse.lissa import LissaOperator
from ..inverse.low_rank import LowRankOperator
from ..inverse.low_rank_approximation import (
    LowRankApproximation,
    default_krylov_dimension,
    lanczos_low_rank,
    nystroem_low_rank,
    validate_rank,
)
from ..inverse.preconditioner import Preconditioner, check_preconditioner
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
    "block_diagnostics",
    "regularization_in_use",
    "resolve_auto_regularization",
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


def _unsupported(solver: "Solver", curvature: TensorOperator, needs: str) -> TypeError:
    return TypeError(
        f"{type(solver).__name__} cannot invert a {type(curvature).__name__}: it needs {needs}."
    )


def regularization_in_use(model: Any) -> Dict[str, Optional[float]]:
    """The $\\lambda$ of every block of an influence model: the requested values, with
    `"auto"` replaced by the value of the block's fitted operator (None if not fitted)."""
    requested = model._regularization_by_block
    fitted = model.block_mapper.composable_block_dict if model.is_fitted else {}
    return {
        name: (getattr(fitted[name].op, "regularization", None) if name in fitted else None)
        if value == AUTO_REGULARIZATION else value
        for name, value in requested.items()
    }  # fmt: skip


def block_diagnostics(op: TensorOperator) -> Optional[SolverDiagnostics]:
    """The diagnostics of a block's operator, with the $\\lambda$ it uses."""
    diagnostics = getattr(op, "diagnostics", None)
    if diagnostics is None:
        return None
    return dataclasses.replace(diagnostics, regularization=getattr(op, "regularization", None))


def resolve_auto_regularization(
    requested: Dict[str, Any],
    fitted_with: Dict[str, Any],
    used: Dict[str, Optional[float]],
    chosen: Dict[str, Optional[float]],
) -> Dict[str, Optional[float]]:
    """The $\\lambda$ of every block for `with_regularization` on a fitted model: `"auto"`
    becomes the value it chose at `fit` (`chosen`, or `used` for a block still on `"auto"`).

    Raises:
        ValueError: for `"auto"` on a block fitted with an explicit value (the curvature's
            scale was never measured).
    """
    result: Dict[str, Optional[float]] = {}
    for name, value in requested.items():
        if value != AUTO_REGULARIZATION:
            result[name] = value
        elif name in chosen:
            result[name] = chosen[name]
        elif fitted_with[name] == AUTO_REGULARIZATION:
            result[name] = used[name]
        else:
            raise ValueError(
                f"Parameter 'regularization': \"auto\" for block {name!r} needs the curvature, "
                f"but this model was fitted with {fitted_with[name]!r}: construct the model "
                'with regularization="auto" and fit it.'
            )
    return result


class Solver(ABC):
    r"""An inverse method: turns a block's curvature $C_b$ and $\lambda_b$ into an operator
    $A_b \approx (C_b + \lambda_b I)^{-1}$."""

    positive_regularization_reason: Optional[str] = None
    """If set, every block needs $\\lambda > 0$, for this reason."""

    on_nonconvergence = "warn"
    """For a block too ill-conditioned for the compute dtype: `"warn"` or `"raise"`."""

    def _set_policy(self, on_nonconvergence: str) -> None:
        """Keep a policy other than `"warn"` (only then a setting of saved fits)."""
        if check_nonconvergence_policy(on_nonconvergence) != "warn":
            self.on_nonconvergence = on_nonconvergence

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

    def fit_block(
        self,
        curvature: TensorOperator,
        regularization: Optional[Union[float, str]],
        block_name: str,
    ) -> TensorOperator:
        """The inverse operator of one block, resolving `"auto"` to
        [auto_regularization][influx.torch.inverse.damping.auto_regularization] of the
        curvature first."""
        if regularization == AUTO_REGULARIZATION:
            regularization = auto_regularization(curvature)
            logger.info("Block %r: automatic regularization %.3g.", block_name, regularization)
        return self.fit(curvature, regularization, block_name)  # type: ignore[arg-type]


class DirectSolver(Solver):
    """The dense curvature of each block, factorised once
    ([DirectSolveOperator][influx.torch.inverse.direct.DirectSolveOperator]); a block too
    ill-conditioned for the compute dtype raises (`on_nonconvergence="raise"`) or warns."""

    def __init__(self, on_nonconvergence: str = "raise"):
        self.on_nonconvergence = check_nonconvergence_policy(on_nonconvergence)

    def fit_block(
        self,
        curvature: TensorOperator,
        regularization: Optional[Union[float, str]],
        block_name: str,
    ) -> TensorOperator:
        return self.fit(curvature, regularization, block_name)  # type: ignore[arg-type]

    def fit(
        self,
        curvature: TensorOperator,
        regularization: Optional[Union[float, str]],
        block_name: str,
    ) -> TensorOperator:
        to_dense = getattr(curvature, "to_dense", None)
        if to_dense is None:
            raise _unsupported(self, curvature, "a curvature with a dense matrix (to_dense)")
        matrix = to_dense()
        if regularization == AUTO_REGULARIZATION:
            regularization = auto_regularization_of_matrix(matrix)
            logger.info("Block %r: automatic regularization %.3g.", block_name, regularization)
        try:
            op = DirectSolveOperator(
                matrix,
                regularization=regularization,  # type: ignore[arg-type]
                on_nonconvergence=getattr(self, "on_nonconvergence", "raise"),
                block_name=block_name,
            )
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
            block_name=block_name,
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
            curvature.batch_operation, curvature.dataloader, regularization,
            block_name=block_name, **self.options,
        )  # fmt: skip


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
        return LowRankOperator(
            approximation.representation, regularization, exact, self.on_nonconvergence,
            approximation.diagnostics, block_name,
        )  # fmt: skip


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

    def __init__(self, rank: int, seed: Optional[int] = None, on_nonconvergence: str = "warn"):
        check_seed(seed)
        self.rank = rank
        self.seed = seed
        self._set_policy(on_nonconvergence)

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

    def __init__(self, progress: bool = False, on_nonconvergence: str = "warn"):
        self.progress = progress
        self._set_policy(on_nonconvergence)

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
            on_nonconvergence=self.on_nonconvergence,
            block_name=block_name,
        )


class FactoredSolver(Solver):
    """The exact inverse of a Kronecker-factored curvature in its eigenbasis
    ([KroneckerFactoredOperator][influx.torch.kfac.operators.KroneckerFactoredOperator]); a layer
    whose $s + \\lambda$ is too ill-conditioned for the compute dtype warns
    (`on_nonconvergence="warn"`, the default) or raises."""

    def __init__(self, on_nonconvergence: str = "warn"):
        self._set_policy(on_nonconvergence)

    def fit(
        self, curvature: TensorOperator, regularization: Optional[float], block_name: str
    ) -> TensorOperator:
        if not isinstance(curvature, KroneckerFactoredCurvature):
            raise _unsupported(self, curvature, "a Kronecker-factored curvature")
        return KroneckerFactoredOperator.from_curvature(
            curvature, regularization, self.on_nonconvergence
        )
