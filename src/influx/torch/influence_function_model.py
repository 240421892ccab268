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

import logging
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..types import InfluenceMode
from .base import TorchBlockMapper, TorchComposableInfluence, TorchOperatorGradientComposition
from .functional import LossFunction
from .kfac import (
    KroneckerFactoredOperator,
    SignalCache,
    collect_kronecker_factors,
    eigendecompose_factors,
    find_layers,
    refit_eigenvalues,
    validate_fisher,
)
from .operator import DirectSolveOperator, SecondOrderMode, curvature_operator
from .util import BlockMode, BlockStructure, RegularizationType, validate_regularization

__all__ = ["DirectInfluence", "EkfacInfluence"]

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
