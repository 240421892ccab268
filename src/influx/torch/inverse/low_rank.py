r"""The inverse a low-rank approximation gives, and how it pairs gradients.

[LowRankOperator][influx.torch.inverse.low_rank.LowRankOperator] turns a low-rank approximation
$C \approx V D V^\top$ (computed by
[influx.torch.inverse.low_rank_approximation][influx.torch.inverse.low_rank_approximation]) into
an approximate inverse of $V D V^\top + \lambda I$, and
[LowRankBilinearForm][influx.torch.inverse.low_rank.LowRankBilinearForm] pairs gradients through
the projections $V^\top \nabla_\theta \ell$ without forming per-sample gradients.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from ...types import SolverDiagnostics
from ..curvature.conditioning import block_prefix, check_eigenvalue_conditioning
from ..curvature.tensor_operator import TensorOperator
from ..data.batches import TorchBatch
from ..data.state import OperatorState, StateContext
from ..data.validation import check_nonconvergence_policy, validate_regularization
from ..gradients.bilinear import OperatorBilinearForm
from ..gradients.provider import TorchGradientProvider
from .sketch import LowRankProductRepresentation

__all__ = [
    "LowRankBilinearForm",
    "LowRankOperator",
]

logger = logging.getLogger(__name__)


class LowRankOperator(TensorOperator):
    r"""An approximate inverse of $V D V^\top + \lambda I$ from a low-rank representation.

    With `exact=True` the inverse is exact (Sherman–Morrison–Woodbury):

    $$
    (V D V^\top + \lambda I)^{-1} b
    = \frac{1}{\lambda}\left(b - V \operatorname{diag}\!\Big(\frac{d_i}{d_i + \lambda}\Big)
      V^\top b\right),
    $$

    which needs $\lambda > 0$: directions outside the span of $V$ are scaled by $1/\lambda$.
    With `exact=False` it is the projected inverse

    $$ V (D + \lambda I)^{-1} V^\top b , $$

    which ignores the directions outside the span of $V$ and allows $\lambda = 0$ or None.
    Entries $d_i + \lambda \le 0$ are logged as a warning (the matrix is then not positive
    definite); entries that are zero to working precision are treated as a pseudo-inverse
    (their direction is dropped).

    What is inverted has the eigenvalues $d_i + \lambda$, and $\lambda$ on the complement of
    the span of $V$ for the exact inverse (when $r < P$); their condition number is checked
    against what the dtype resolves (see
    [influx.torch.curvature.conditioning][influx.torch.curvature.conditioning]): beyond it
    `diagnostics.converged` is False and the message naming $\lambda$ and the smallest safe
    value is logged as a warning or raised, per `on_nonconvergence`.

    Args:
        low_rank_representation: $V$ `(P, r)` orthonormal and $D$ `(r,)`.
        regularization: $\lambda$; must be positive when `exact` is True.
        exact: use the Woodbury formula (True) or the projected inverse (False).
        on_nonconvergence: `"warn"` (default) or `"raise"` (an
            [IllConditionedError][influx.errors.IllConditionedError]) for an ill-conditioned
            $V D V^\top + \lambda I$.
        diagnostics: the diagnostics of the approximation (e.g. Lanczos'), completed with the
            condition number; default a report of method `"low_rank"`.
        block_name: named in the messages, if given (the block of an influence model).
    """

    def _reference(self) -> Any:
        return self._low_rank_representation.projections

    def __init__(
        self,
        low_rank_representation: LowRankProductRepresentation,
        regularization: Optional[float] = None,
        exact: bool = True,
        on_nonconvergence: str = "warn",
        diagnostics: Optional[SolverDiagnostics] = None,
        block_name: Optional[str] = None,
    ):
        if not isinstance(low_rank_representation, LowRankProductRepresentation):
            raise TypeError(
                "Parameter 'low_rank_representation' must be a LowRankProductRepresentation, "
                f"got {type(low_rank_representation).__name__}."
            )
        validate_regularization(regularization)
        self.on_nonconvergence = check_nonconvergence_policy(on_nonconvergence)
        self.block_name = block_name
        self._approximation_diagnostics = diagnostics or SolverDiagnostics("low_rank", True)
        self._exact = exact
        self._check_regularization(regularization)
        self._low_rank_representation = low_rank_representation
        self._regularization = regularization
        self._regularization_changed()

    def _check_regularization(self, regularization: Optional[float]) -> None:
        if self._exact and (regularization is None or regularization <= 0):
            raise ValueError(
                "Parameter 'regularization' must be positive when exact=True (the Woodbury "
                f"formula scales directions outside the low-rank span by 1/λ), got "
                f"{regularization}. Pass a positive value or exact=False."
            )

    def _regularization_changed(self) -> None:
        eigen_vals = self._low_rank_representation.eigen_vals
        lam = float(self._regularization or 0.0)
        shifted = eigen_vals + lam
        scale = max(float(eigen_vals.abs().max()) if eigen_vals.numel() else 0.0, lam)
        singular = shifted.abs() <= (
            max(eigen_vals.numel(), 1) * torch.finfo(eigen_vals.dtype).eps * scale
        )
        if bool((shifted <= 0).any()):
            logger.warning(
                "LowRankOperator: %d of %d entries of D + λI are not positive (smallest "
                "%.3g): the regularized matrix is not positive definite%s.",
                int((shifted <= 0).sum()),
                shifted.numel(),
                float(shifted.min()),
                "; entries that are zero are dropped (pseudo-inverse)" if singular.any() else "",
            )
        safe = torch.where(singular, torch.ones_like(shifted), shifted)
        if self._exact:
            # (1/λ)(I - V diag(c) V^T) with c = d / (d + λ); c = 1 drops a singular direction.
            self.coefficients = torch.where(singular, torch.ones_like(shifted), eigen_vals / safe)
        else:
            self.coefficients = torch.where(singular, torch.zeros_like(shifted), 1.0 / safe)
        self._check_conditioning(shifted, lam)

    def _check_conditioning(self, shifted: torch.Tensor, lam: float) -> None:
        """The diagnostics of the approximation with the condition number of what is
        inverted, reported per the policy."""
        base = getattr(self, "_approximation_diagnostics", None) or SolverDiagnostics(
            "low_rank", True
        )
        self.diagnostics = dataclasses.replace(
            base, details=dict(base.details), regularization=self._regularization
        )
        inverted = shifted
        size = self._low_rank_representation.projections.shape[0]
        if self._exact and shifted.numel() < size:
            inverted = torch.cat([shifted, shifted.new_tensor([lam])])
        check_eigenvalue_conditioning(
            f"{self.diagnostics.method} inverse", inverted, self._regularization,
            shifted.dtype, getattr(self, "on_nonconvergence", "warn"), self.diagnostics,
            where=block_prefix(getattr(self, "block_name", None)),
        )  # fmt: skip

    def export_state(self) -> OperatorState:
        return OperatorState(
            "LowRankOperator",
            tensors={
                "eigen_vals": self._low_rank_representation.eigen_vals,
                "projections": self._low_rank_representation.projections,
            },
            settings={
                "regularization": self._regularization,
                "exact": self._exact,
                "on_nonconvergence": self.on_nonconvergence,
            },
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "LowRankOperator":
        representation = LowRankProductRepresentation(
            state.tensors["eigen_vals"], state.tensors["projections"]
        )
        return cls(
            representation,
            state.settings["regularization"],
            state.settings["exact"],
            state.settings.get("on_nonconvergence", "warn"),
        )

    @property
    def low_rank_representation(self) -> LowRankProductRepresentation:
        """The representation $V D V^\\top$."""
        return self._low_rank_representation

    @property
    def exact(self) -> bool:
        """Whether the Woodbury formula (exact inverse) is used."""
        return self._exact

    def project(self, tensor: torch.Tensor) -> torch.Tensor:
        """$V^\\top b$ for every row $b$ of `tensor` `(N, P)`, shape `(N, r)`."""
        return tensor @ self._low_rank_representation.projections

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.dtype)
        projections = self._low_rank_representation.projections
        low_rank = (self.project(tensor) * self.coefficients) @ projections.T
        if self._exact:
            return (tensor - low_rank) / float(self._regularization)  # type: ignore[arg-type]
        return low_rank

    def as_bilinear_form(self) -> "LowRankBilinearForm":
        return LowRankBilinearForm(self)


class LowRankBilinearForm(OperatorBilinearForm):
    r"""The bilinear form of a [LowRankOperator][influx.torch.inverse.low_rank.LowRankOperator],
    evaluated through projections.

    For the projected inverse ($A = V C V^\top$, $C = (D + \lambda I)^{-1}$)

    $$
    \langle A \nabla_\theta \ell(z), \nabla_\theta \ell(z')\rangle
    = (V^\top \nabla_\theta \ell(z))^\top \, C \, (V^\top \nabla_\theta \ell(z')) ,
    $$

    and $V^\top \nabla_\theta \ell(z')$ is obtained by one Jacobian-vector product per column
    of $V$ (`jacobian_prod` of [TorchGradientProvider][influx.torch.gradients.provider.TorchGradientProvider]): the
    per-sample gradients are never formed, memory is $O(N r)$ instead of $O(N P)$.
    For the exact (Woodbury) inverse, the identity term
    $\frac{1}{\lambda}\langle \nabla_\theta \ell(z), \nabla_\theta \ell(z')\rangle$ needs the
    full gradients, so the gradients are paired directly, as in
    [OperatorBilinearForm][influx.torch.gradients.bilinear.OperatorBilinearForm].
    """

    operator: LowRankOperator

    def __init__(self, operator: LowRankOperator):
        if not isinstance(operator, LowRankOperator):
            raise TypeError(
                f"Parameter 'operator' must be a LowRankOperator, got {type(operator).__name__}."
            )
        super().__init__(operator)

    def inner_prod(self, left: torch.Tensor, right: Optional[torch.Tensor]) -> torch.Tensor:
        if self.operator.exact:
            return super().inner_prod(left, right)
        op = self.operator
        left_proj = op.project(left.to(op.device, op.dtype))
        right_proj = left_proj if right is None else op.project(right.to(op.device, op.dtype))
        return (left_proj * op.coefficients) @ right_proj.T

    def grads_inner_prod(
        self,
        left: TorchBatch,
        right: Optional[TorchBatch],
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        r"""$\langle A \nabla_\theta \ell(\text{left}_i), \nabla_\theta \ell(\text{right}_j)
        \rangle$, shape `(N_left, N_right)`; through Jacobian-vector products with the
        columns of $V$ for the projected inverse."""
        op = self.operator
        if op.exact:
            return super().grads_inner_prod(left, right, gradient_provider)
        directions = op.low_rank_representation.projections.T
        left_proj = gradient_provider.jacobian_prod(left, directions)
        right_proj = (
            left_proj if right is None else gradient_provider.jacobian_prod(right, directions)
        )
        return (left_proj * op.coefficients) @ right_proj.T
