r"""The EK-FAC preconditioner of conjugate gradient: a Kronecker-factored approximate inverse of
each `Linear` / `Conv2d` layer of a block, fitted from the curvature operator's own model and
training data (the factors and their inverse are in
[influx.torch.kfac.preconditioner][influx.torch.kfac.preconditioner]).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from ..curvature.tensor_operator import TensorOperator
from ..data.state import OperatorState, StateContext, restore_operator
from ..data.validation import (
    check_positive_int,
)
from ..kfac.preconditioner import (
    KroneckerBlockInverse,
    fit_kronecker_block_inverse,
    validate_kronecker_options,
)
from .preconditioner import Preconditioner

__all__ = ["EkfacPreconditioner"]

logger = logging.getLogger(__name__)


class EkfacPreconditioner(Preconditioner):
    r"""Kronecker-factored (EK-FAC) preconditioner, fitted from the training data of the block.

    `fit` takes the curvature operator $A$ of a block (as
    [CgInfluence][influx.torch.models.cg.CgInfluence] builds it: Hessian,
    Gauss-Newton or generalized Gauss-Newton, carrying its model, loss and data loader) and,
    for every `nn.Linear` and `nn.Conv2d` layer with parameters in the block, collects the
    Kronecker factors of the Fisher in one pass over the same data, eigendecomposes them and,
    with `update_diagonal`, refits the eigenvalues (EK-FAC; see [influx.torch.kfac.factors][]):
    $F_\ell \approx Q_\ell \,\mathrm{diag}(s_\ell)\, Q_\ell^\top$. Then

    $$
    P^{-1} = \mathrm{blockdiag}_\ell\Big(Q_\ell\, \mathrm{diag}(s_\ell + \lambda)^{-1}
    Q_\ell^\top\Big) \oplus \mathrm{diag}(\hat d + \lambda)^{-1} ,
    $$

    where the last block covers the parameters of other layers: $\hat d$ is a Hutchinson
    estimate of their diagonal of $A$ (`fallback="jacobi"`, as
    [JacobiPreconditioner][influx.torch.inverse.preconditioner.JacobiPreconditioner]) or $P^{-1}$ is
    the identity there (`fallback="identity"`). A curvature operator without model and data
    (a [MatrixOperator][influx.torch.curvature.tensor_operator.MatrixOperator], the precomputed Gauss-Newton
    operator of `precompute_grad`) gets the fallback on all coordinates, with a warning.
    Kronecker eigenvalues below $10^{-6}$ times their layer's mean are raised to it so that
    $P^{-1}$ stays finite at $\lambda = 0$ (see
    [influx.torch.kfac.preconditioner][influx.torch.kfac.preconditioner]).

    **When it helps.** EK-FAC approximates the empirical Fisher (`fisher="empirical"`, the
    `GAUSS_NEWTON` curvature) or, with `fisher="sampled"`, the true Fisher, which is the
    generalized Gauss-Newton matrix of the cross-entropy in expectation. It is exact where
    the curvature is Kronecker-factored per layer, and CG then converges in a handful of
    iterations; it neglects the coupling between layers and, for the Hessian, the
    second-order terms of the model. Fitting costs one or two passes over the data, and the
    fit does not depend on $\lambda$: changing the regularization needs no refit.

    Args:
        update_diagonal: refit the eigenvalues in the Kronecker eigenbasis (EK-FAC) instead of
            using the products of the factors' eigenvalues (K-FAC).
        fisher: `"empirical"` (training labels) or `"sampled"` (labels drawn from the
            model's predictive distribution; cross-entropy only).
        fallback: `"jacobi"` or `"identity"`, for parameters outside `Linear` / `Conv2d`
            layers.
        num_samples_estimator: the number of probes of the diagonal estimate (`"jacobi"`).
        seed: seed of the label sampling (`fisher="sampled"`) and of the probes; None uses
            fresh random state.
        max_cache_mb: with `update_diagonal` and the empirical Fisher, the layer signals of
            the first pass are kept up to this size (MB) so that the refit needs no second
            pass (a sampled Fisher refits on fresh label draws, in a second pass).
        progress: show progress bars over the batches.

    Example:
        ```python
        model = CgInfluence(net, F.cross_entropy, 0.01, preconditioner=EkfacPreconditioner(),
                            second_order_mode=SecondOrderMode.GENERALIZED_GAUSS_NEWTON)
        model.fit(train_loader)
        ```
    """

    def __init__(
        self,
        update_diagonal: bool = True,
        fisher: str = "empirical",
        fallback: str = "jacobi",
        num_samples_estimator: int = 1,
        seed: Optional[int] = None,
        max_cache_mb: float = 256.0,
        progress: bool = False,
    ):
        validate_kronecker_options(fisher, fallback)
        check_positive_int(num_samples_estimator, "num_samples_estimator")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"Parameter 'seed' must be an int or None, got {type(seed).__name__}.")
        if isinstance(max_cache_mb, bool) or not isinstance(max_cache_mb, (int, float)):
            raise TypeError(
                f"Parameter 'max_cache_mb' must be a number, got {type(max_cache_mb).__name__}."
            )
        if not max_cache_mb >= 0:
            raise ValueError(f"Parameter 'max_cache_mb' must be >= 0, got {max_cache_mb}.")
        self.update_diagonal = bool(update_diagonal)
        self.fisher = fisher
        self.fallback = fallback
        self.num_samples_estimator = num_samples_estimator
        self.seed = seed
        self.max_cache_mb = max_cache_mb
        self.progress = progress
        self._inverse: Optional[KroneckerBlockInverse] = None

    @property
    def is_fitted(self) -> bool:
        return self._inverse is not None

    @property
    def modify_regularization_requires_fit(self) -> bool:
        return False

    @property
    def kronecker_inverse(self) -> Optional[KroneckerBlockInverse]:
        """The fitted approximate inverse: per-layer Kronecker operators and the fallback
        diagonal ([KroneckerBlockInverse][influx.torch.kfac.preconditioner.KroneckerBlockInverse])."""
        return self._inverse

    def _fit(self, operator: TensorOperator, regularization: Optional[float]) -> None:
        self._inverse = fit_kronecker_block_inverse(
            operator,
            update_diagonal=self.update_diagonal,
            fisher=self.fisher,
            fallback=self.fallback,
            num_samples_estimator=self.num_samples_estimator,
            seed=self.seed,
            progress=self.progress,
            max_cache_mb=self.max_cache_mb,
        )

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        assert self._inverse is not None
        return self._inverse.solve(rhs, self._regularization)

    def _options(self) -> Dict[str, Any]:
        return {
            "update_diagonal": self.update_diagonal,
            "fisher": self.fisher,
            "fallback": self.fallback,
            "num_samples_estimator": self.num_samples_estimator,
            "seed": self.seed,
            "max_cache_mb": self.max_cache_mb,
            "progress": self.progress,
        }

    def export_state(self) -> OperatorState:
        if self._inverse is None:
            raise ValueError("EkfacPreconditioner is not fitted: nothing to export.")
        inverse = self._inverse
        names = list(inverse.layers)
        tensors = {"rest": inverse.rest}
        if inverse.diagonal is not None:
            tensors["diagonal"] = inverse.diagonal
        for i, name in enumerate(names):
            tensors[f"index{i}"] = inverse.layers[name][1]
        children = {
            f"layer{i}": inverse.layers[name][0].export_state() for i, name in enumerate(names)
        }
        settings = {
            **self._options(),
            "regularization": self._regularization,
            "size": inverse.size,
            "layers": names,
        }
        return OperatorState("EkfacPreconditioner", tensors, settings, children)

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "EkfacPreconditioner":
        settings = dict(state.settings)
        names = settings.pop("layers")
        size = settings.pop("size")
        regularization = settings.pop("regularization")
        new = cls(**settings)
        layers = {
            name: (
                restore_operator(state.children[f"layer{i}"], context),
                state.tensors[f"index{i}"],
            )
            for i, name in enumerate(names)
        }
        new._inverse = KroneckerBlockInverse(
            size, layers, state.tensors.get("diagonal"), state.tensors["rest"]
        )
        new._regularization = regularization
        return new
