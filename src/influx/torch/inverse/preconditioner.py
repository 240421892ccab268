r"""Preconditioners for conjugate gradient on $(A + \lambda I) x = b$.

A preconditioner is a cheap approximation $P^{-1} \approx (A + \lambda I)^{-1}$; CG applied to
the preconditioned system needs fewer iterations the closer $P^{-1}(A + \lambda I)$ is to the
identity. All preconditioners here separate what depends on the curvature $A$ (estimated
once, in `fit`) from what depends on $\lambda$ (applied in `solve`), so changing the
regularization never requires a new pass over the data.

* [JacobiPreconditioner][influx.torch.inverse.preconditioner.JacobiPreconditioner]: the diagonal of
  $A$, estimated stochastically.
* [NystroemPreconditioner][influx.torch.inverse.preconditioner.NystroemPreconditioner]: a randomized
  low-rank approximation of $A$ (Frangella, Tropp and Udell, 2023).
* [EkfacPreconditioner][influx.torch.inverse.ekfac_preconditioner.EkfacPreconditioner] (in its
  own module): the EK-FAC (Kronecker-factored) approximation of each `Linear` / `Conv2d` layer
  of the block, fitted from the curvature operator's own model and training data.

Right-hand sides are the rows of a tensor `(N, P)`.
"""

from __future__ import annotations

import copy
import logging
import math
from abc import ABC, abstractmethod
from typing import Optional, Union

import torch

from ..curvature.tensor_operator import TensorOperator, move_to_device
from ..data.state import OperatorState, StateContext, Stateful
from ..data.validation import (
    check_positive_int,
    check_seed,
    make_generator,
    validate_regularization,
)
from .sketch import LowRankProductRepresentation, randomized_nystroem_approximation

__all__ = [
    "Preconditioner",
    "JacobiPreconditioner",
    "NystroemPreconditioner",
]

logger = logging.getLogger(__name__)


class Preconditioner(Stateful, ABC):
    r"""An approximation $P^{-1}$ of $(A + \lambda I)^{-1}$ for a curvature operator $A$.

    Call [fit][influx.torch.inverse.preconditioner.Preconditioner.fit] with the operator and the
    regularization, then [solve][influx.torch.inverse.preconditioner.Preconditioner.solve] applies
    $P^{-1}$ to the rows of a tensor.
    """

    _regularization: Optional[float] = None
    _operator: Optional[TensorOperator] = None

    @property
    def regularization(self) -> Optional[float]:
        """The regularization $\\lambda$ the preconditioner is set up for."""
        return self._regularization

    @regularization.setter
    def regularization(self, value: Optional[float]) -> None:
        validate_regularization(value)
        if self.modify_regularization_requires_fit:
            raise NotImplementedError(
                f"{type(self).__name__} must be refitted for another regularization: call "
                "'fit' or 'with_regularization'."
            )
        self._regularization = value

    @property
    @abstractmethod
    def modify_regularization_requires_fit(self) -> bool:
        """Whether a change of $\\lambda$ requires a new `fit` (a pass over the data)."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether `fit` has been called."""

    def fit(
        self, operator: TensorOperator, regularization: Optional[float] = None
    ) -> "Preconditioner":
        """Fit the preconditioner to the curvature operator $A$ and $\\lambda$; return self.

        Args:
            operator: the curvature operator $A$ (without regularization).
            regularization: $\\lambda \\ge 0$, or None.
        """
        if not isinstance(operator, TensorOperator):
            raise TypeError(
                f"Parameter 'operator' must be a TensorOperator, got {type(operator).__name__}."
            )
        validate_regularization(regularization)
        self._operator = operator
        self._regularization = regularization
        self._fit(operator, regularization)
        return self

    @abstractmethod
    def _fit(self, operator: TensorOperator, regularization: Optional[float]) -> None:
        """Compute what the preconditioner needs from the operator."""

    def with_regularization(self, regularization: Optional[float]) -> "Preconditioner":
        """A copy set up for another $\\lambda$, refitted only if
        `modify_regularization_requires_fit` (self is unchanged)."""
        validate_regularization(regularization)
        if not self.is_fitted:
            raise ValueError(
                f"{type(self).__name__} is not fitted: call 'fit' before 'with_regularization'."
            )
        new = copy.copy(self)
        if self.modify_regularization_requires_fit:
            assert self._operator is not None
            return new.fit(self._operator, regularization)
        new._regularization = regularization
        return new

    def to(self, device: Union[torch.device, str]) -> "Preconditioner":
        """Move the fitted quantities (and the operator they came from) to `device`; return
        self."""
        return move_to_device(self, device)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Apply $P^{-1}$ to a vector `(P,)` or to every row of a matrix `(N, P)`."""
        if not self.is_fitted:
            raise ValueError(f"{type(self).__name__} is not fitted: call 'fit' first.")
        if rhs.ndim == 1:
            return self._solve(rhs.unsqueeze(0)).squeeze(0)
        return self._solve(rhs)

    @abstractmethod
    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Apply $P^{-1}$ to the rows of a 2-D tensor."""


class JacobiPreconditioner(Preconditioner):
    r"""Diagonal (Jacobi) preconditioner with a stochastic estimate of the diagonal.

    The diagonal of $A$ is estimated with Hutchinson's estimator, from $k$ Rademacher vectors
    $z_i \in \{-1, 1\}^P$ applied to $A$ in one call:

    $$
    \hat d = \frac{1}{k}\sum_{i=1}^{k} z_i \odot A z_i, \qquad
    P^{-1} v = v \oslash \left(\max(\hat d, \tau) + \lambda\right).
    $$

    The estimate is exact for a diagonal $A$ and unbiased otherwise, but with few samples
    entries can come out too small or negative; they are raised to
    $\tau = 10^{-2} \cdot \operatorname{mean}|\hat d|$ so that the preconditioner stays
    positive definite. $\hat d$ does not depend on $\lambda$: changing the regularization
    needs no refit.

    Args:
        num_samples_estimator: the number $k$ of random vectors.
        seed: seed of the random vectors; the same seed gives the same diagonal estimate.
    """

    FLOOR_FRACTION = 1e-2
    """Entries of $\\hat d$ below this fraction of its mean absolute value are raised to it."""

    def __init__(self, num_samples_estimator: int = 1, seed: Optional[int] = None):
        check_positive_int(num_samples_estimator, "num_samples_estimator")
        check_seed(seed)
        self.num_samples_estimator = num_samples_estimator
        self.seed = seed
        self._diagonal: Optional[torch.Tensor] = None

    @property
    def is_fitted(self) -> bool:
        return self._diagonal is not None

    @property
    def modify_regularization_requires_fit(self) -> bool:
        return False

    @property
    def diagonal(self) -> Optional[torch.Tensor]:
        """The (floored) diagonal estimate $\\max(\\hat d, \\tau)$ of $A$, without $\\lambda$."""
        return self._diagonal

    def _fit(self, operator: TensorOperator, regularization: Optional[float]) -> None:
        size = operator.input_size
        signs = torch.randint(
            0,
            2,
            (self.num_samples_estimator, size),
            device=operator.device,
            generator=make_generator(self.seed, operator.device),
        ).to(operator.dtype)
        z = 2 * signs - 1
        estimate = (z * operator.apply(z)).mean(dim=0)
        if not bool(torch.isfinite(estimate).all()):
            raise ValueError("JacobiPreconditioner: the operator produced NaN or Inf.")
        floor = self.FLOOR_FRACTION * float(estimate.abs().mean())
        if floor == 0.0:
            floor = 1.0
        self._diagonal = torch.clamp(estimate, min=floor)

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        assert self._diagonal is not None
        return rhs / (self._diagonal + (self._regularization or 0.0))

    def export_state(self) -> OperatorState:
        if self._diagonal is None:
            raise ValueError("JacobiPreconditioner is not fitted: nothing to export.")
        return OperatorState(
            "JacobiPreconditioner",
            tensors={"diagonal": self._diagonal},
            settings={
                "num_samples_estimator": self.num_samples_estimator,
                "seed": self.seed,
                "regularization": self._regularization,
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "JacobiPreconditioner":
        new = cls(state.settings["num_samples_estimator"], state.settings.get("seed"))
        new._diagonal = state.tensors["diagonal"]
        new._regularization = state.settings["regularization"]
        return new


class NystroemPreconditioner(Preconditioner):
    r"""Randomized Nyström preconditioner (Frangella, Tropp and Udell, 2023).

    A rank-$r$ Nyström approximation $A \approx U \Lambda U^\top$
    (see [randomized_nystroem_approximation][influx.torch.inverse.sketch.randomized_nystroem_approximation])
    with eigenvalues $\lambda_1 \ge \dots \ge \lambda_r$ gives

    $$
    P^{-1} = (\lambda_r + \lambda)\, U (\Lambda + \lambda I)^{-1} U^\top + (I - U U^\top),
    $$

    which maps the top $r$ eigenvalues of $A + \lambda I$ to about $\lambda_r + \lambda$ and
    leaves the rest of the spectrum alone: the condition number drops from
    $(\lambda_1 + \lambda)/\lambda_{\min}$ to about $(\lambda_r + \lambda)/\lambda_{\min}$.
    Fitting costs one application of $A$ to $r$ vectors; $\lambda$ only enters `solve`, so
    changing the regularization needs no refit. A rank larger than the operator's input size
    is reduced to the input size (exact approximation).

    Args:
        rank: the rank $r$ of the approximation.
        seed: seed of the random sketch; the same seed gives the same preconditioner.
    """

    def __init__(self, rank: int, seed: Optional[int] = None):
        check_positive_int(rank, "rank")
        check_seed(seed)
        self._rank = rank
        self.seed = seed
        self._low_rank: Optional[LowRankProductRepresentation] = None

    @property
    def rank(self) -> int:
        """The requested rank $r$."""
        return self._rank

    @property
    def low_rank_approx(self) -> Optional[LowRankProductRepresentation]:
        """The fitted approximation $U \\Lambda U^\\top$ of $A$."""
        return self._low_rank

    @property
    def is_fitted(self) -> bool:
        return self._low_rank is not None

    @property
    def modify_regularization_requires_fit(self) -> bool:
        return False

    def _fit(self, operator: TensorOperator, regularization: Optional[float]) -> None:
        size = operator.input_size
        rank = min(self._rank, size)
        if rank < self._rank:
            logger.debug(
                "NystroemPreconditioner: rank %d reduced to the size %d.", self._rank, size
            )
        self._low_rank = randomized_nystroem_approximation(
            lambda x: operator.apply(x.T).T,
            size,
            rank,
            operator.dtype,
            mat_vec_device=operator.device,
            generator=make_generator(self.seed, operator.device),
        )

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        assert self._low_rank is not None
        lam = self._regularization or 0.0
        u = self._low_rank.projections
        evals = self._low_rank.eigen_vals
        smallest = float(evals.min()) + lam
        if smallest <= 0 or not math.isfinite(smallest):
            # A zero approximation and lambda = 0: nothing to precondition with.
            return rhs.clone()
        coefficients = rhs @ u  # (N, r)
        scaled = coefficients * (smallest / (evals + lam))
        return rhs - coefficients @ u.T + scaled @ u.T

    def export_state(self) -> OperatorState:
        if self._low_rank is None:
            raise ValueError("NystroemPreconditioner is not fitted: nothing to export.")
        return OperatorState(
            "NystroemPreconditioner",
            tensors={
                "eigen_vals": self._low_rank.eigen_vals,
                "projections": self._low_rank.projections,
            },
            settings={
                "rank": self._rank,
                "seed": self.seed,
                "regularization": self._regularization,
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "NystroemPreconditioner":
        new = cls(state.settings["rank"], state.settings.get("seed"))
        new._low_rank = LowRankProductRepresentation(
            state.tensors["eigen_vals"], state.tensors["projections"]
        )
        new._regularization = state.settings["regularization"]
        return new


def check_preconditioner(preconditioner: Optional[Preconditioner]) -> None:
    """Raise a TypeError unless `preconditioner` is a Preconditioner or None."""
    if preconditioner is not None and not isinstance(preconditioner, Preconditioner):
        raise TypeError(
            "Parameter 'preconditioner' must be a Preconditioner or None, got "
            f"{type(preconditioner).__name__}."
        )
