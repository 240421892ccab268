r"""Influence through the Kronecker-factored curvature of each layer (K-FAC / EK-FAC)."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch

from ...types import InfluenceMode
from ..autodiff.derivatives import LossFunction
from ..composition.block_mapper import TorchBlockMapper, TorchOperatorGradientComposition
from ..composition.composable import TorchComposableInfluence
from ..composition.curvatures import KroneckerCurvature
from ..composition.solvers import FactoredSolver
from ..data.validation import RegularizationType, validate_regularization
from ..kfac.factors import (
    KroneckerEigenbasis,
    KroneckerFactors,
    LayerSpec,
    find_layers,
    validate_fisher,
)
from ..kfac.layers import split_layers
from ..kfac.operators import KroneckerFactoredCurvature
from ..kfac.scoring import layer_block_mapper

__all__ = ["OTHER_LAYERS", "EkfacInfluence"]

logger = logging.getLogger(__name__)


class _NotGiven:
    """The default of the alias `regularization`: not given (None means no regularization)."""

    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN = _NotGiven()

OTHER_LAYERS = ("freeze", "error")
"""What [EkfacInfluence][influx.torch.models.ekfac.EkfacInfluence] does, without `layers`, with
the trainable modules that have no Kronecker-factored representation."""


class EkfacInfluence(TorchComposableInfluence):
    r"""Influence through the Kronecker-factored curvature of each layer (K-FAC or EK-FAC).

    Every trainable `nn.Linear` and `nn.Conv2d` layer is one block (named after its module;
    a model that is itself a single layer gives the block `"model"`). On `fit`, one pass over
    the data collects, per layer, the input covariance $A$ and the output-gradient covariance
    $G$ with module hooks, and eigendecomposes both in float64; with `update_diagonal=True`
    a second pass refits the eigenvalues in the Kronecker eigenbasis (EK-FAC). See
    [influx.torch.kfac.factors][influx.torch.kfac.factors] for the formulas. Influence factors are

    $$
    (F_b + \lambda I)^{-1} \nabla_{\theta_b}\ell(z'), \qquad
    F_b \approx (Q_G \otimes Q_A)\, \mathrm{diag}(s)\, (Q_G \otimes Q_A)^\top ,
    $$

    applied by rotating into the eigenbasis, dividing by $s + \lambda$ and rotating back
    ([KroneckerFactoredOperator][influx.torch.kfac.operators.KroneckerFactoredOperator]), never forming a
    $P_b \times P_b$ matrix. Influences sum over layers; the curvature is block-diagonal
    across layers.

    **Which curvature.** By default (`fisher="empirical"`) the gradient signal uses the
    training labels, so $F$ approximates the *empirical Fisher*
    $\frac{1}{n}\sum_i \nabla_\theta\ell_i\nabla_\theta\ell_i^\top$, the matrix that
    [DirectInfluence][influx.torch.models.direct.DirectInfluence] uses with
    `second_order_mode=SecondOrderMode.GAUSS_NEWTON`. With `fisher="sampled"` (cross-entropy
    only) labels are drawn from the model's predictive distribution and $F$ approximates the
    *true Fisher* (the generalised Gauss-Newton matrix of the cross-entropy).

    **Losses.** Any loss with mean reduction over samples whose per-sample gradient is the
    batch size times the gradient of the batch loss: cross-entropy (the default) and MSE are
    tested. Layers must process samples independently (no batch-norm in training mode).

    **Whole models.** Without `layers`, every `Linear` and `Conv2d` layer with trainable
    parameters is a block, and the other modules with trainable parameters (batch and layer
    norms, embeddings, grouped convolutions, recurrent layers) are handled as `other_layers`
    says: `"freeze"` (the default) holds their parameters fixed, as if `requires_grad` were
    False (the influence is that of the factored layers' parameters), `"error"` refuses the
    model. One log line (INFO) says which layers went where.

    Args:
        model: the trained model.
        update_diagonal: refit the eigenvalues (EK-FAC) instead of using the products of the
            factors' eigenvalues (K-FAC). One more pass over the data.
        hessian_regularization: $\lambda \ge 0$, a float for all layers or a dict naming every
            layer; `"auto"` (the default) is $0.1 \operatorname{mean}(s)$ per layer (see
            [influx.torch.inverse.damping][influx.torch.inverse.damping]); None or 0 mean no
            regularization, as in every model, and a layer whose $s$ is then too
            ill-conditioned for the compute dtype is reported per `on_nonconvergence`.
        progress: show progress bars over the batches.
        loss: the loss `loss(prediction, target)` with mean reduction; default
            `torch.nn.functional.cross_entropy`.
        regularization: an alias of `hessian_regularization`, under the name the other models
            use; when given (None included: no regularization) it replaces it.
        fisher: `"empirical"` (training labels) or `"sampled"` (labels drawn from the model).
        layers: the module names of the layers to use; None means every `Linear` / `Conv2d`
            module with trainable parameters (see `other_layers` for the others). Parameters
            of modules not listed are held fixed.
        seed: seed of the label sampling for `fisher="sampled"`.
        max_cache_mb: with `update_diagonal` and `fisher="empirical"`, the layers' inputs and
            output gradients of the first pass are kept in memory up to this size (in MB) so
            that the refit needs no second pass over the data; beyond it, or with 0, the data
            is iterated twice, with the same results (the training labels do not change).
            With `fisher="sampled"` the cache is not used: the refit makes a second pass with
            labels drawn afresh, independent of the draws the eigenbasis was fitted to (reusing
            them fits both to the same noise, a less accurate approximation).
        compute_dtype: the dtype of the factors' products and the solves; None means float32
            for a float16 / bfloat16 model and the model's dtype otherwise (see
            [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]).
        other_layers: without `layers`, what to do with trainable modules that are neither
            `Linear` nor (non-grouped) `Conv2d`: `"freeze"` holds their parameters fixed,
            `"error"` raises
            [NotImplementedLayerRepresentationException][influx.torch.kfac.layers.NotImplementedLayerRepresentationException].
        on_nonconvergence: for a layer whose $s + \lambda$ has a condition number beyond what
            the compute dtype resolves (see
            [influx.torch.curvature.conditioning][influx.torch.curvature.conditioning]):
            `"warn"` (the default: log a warning naming $\lambda$ and the smallest safe
            value; the layer's diagnostics say `converged=False`) or `"raise"` (an
            [IllConditionedError][influx.errors.IllConditionedError] at `fit`).

    Attributes:
        layer_specs: the layers used, by block name
            ([LayerSpec][influx.torch.kfac.layers.LayerSpec]).
        curvature: the [KroneckerCurvature][influx.torch.composition.curvatures.KroneckerCurvature]
            fitted on `fit`; `ComposedInfluence(model, loss, KroneckerCurvature(), CgSolver())`
            inverts the same curvature by CG instead.
        kronecker_factors: after `fit`, $A$ and $G$ of every layer
            ([KroneckerFactors][influx.torch.kfac.factors.KroneckerFactors], float64).
        eigenbases: after `fit`, their eigendecompositions
            ([KroneckerEigenbasis][influx.torch.kfac.factors.KroneckerEigenbasis]).
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
        hessian_regularization: RegularizationType = "auto",
        progress: bool = False,
        *,
        loss: Optional[LossFunction] = None,
        regularization: Union[RegularizationType, _NotGiven] = _NOT_GIVEN,
        fisher: str = "empirical",
        layers: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        max_cache_mb: float = 256.0,
        compute_dtype: Optional[torch.dtype] = None,
        other_layers: str = "freeze",
        on_nonconvergence: str = "warn",
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Parameter 'model' must be a torch.nn.Module, got {type(model).__name__}."
            )
        if callable(update_diagonal) or not isinstance(update_diagonal, (bool, int)):
            raise TypeError(
                "Parameter 'update_diagonal' must be a bool, got "
                f"{type(update_diagonal).__name__}: EkfacInfluence's second positional "
                "argument is update_diagonal, pass the loss by keyword (loss=...)."
            )
        if not isinstance(regularization, _NotGiven):
            if hessian_regularization != "auto" and hessian_regularization != regularization:
                raise ValueError(
                    "Parameters 'hessian_regularization' and 'regularization' are aliases: pass "
                    f"one of them, got {hessian_regularization!r} and {regularization!r}."
                )
            hessian_regularization = regularization
        # the alias is recorded as folded into hessian_regularization
        self._settings.update(hessian_regularization=hessian_regularization, regularization=None)
        if on_nonconvergence == "warn":  # the default: fits saved before it existed load
            self._settings.pop("on_nonconvergence", None)
        if other_layers not in OTHER_LAYERS:
            raise ValueError(
                f"Parameter 'other_layers' must be one of {list(OTHER_LAYERS)}, got "
                f"{other_layers!r}."
            )
        self.other_layers = other_layers
        if layers is None and other_layers == "freeze":
            layers = _factored_layers(model)
        if layers is None or self._arguments.get("layers") is not None:
            # every trainable module is factored (or they are listed): the fit does not
            # depend on other_layers, and fits saved before it existed load
            self._settings.pop("other_layers", None)
        loss = torch.nn.functional.cross_entropy if loss is None else loss
        self.fisher = validate_fisher(fisher, loss)
        self.layer_specs: Dict[str, LayerSpec] = find_layers(model, layers)
        self.update_diagonal = bool(update_diagonal)
        curvature = KroneckerCurvature(
            self.update_diagonal, fisher, layers, seed, max_cache_mb, progress
        )
        structure = None  # the layers are the blocks
        self._compose(
            model,
            loss,
            curvature,
            FactoredSolver(on_nonconvergence),
            structure,  # type: ignore[arg-type]
            hessian_regularization,
            compute_dtype,
        )
        if self.model is not model:  # computing on a copy in compute_dtype
            self.layer_specs = find_layers(self.model, layers)
        self.hessian_regularization = hessian_regularization

    @property
    def method(self) -> str:
        """`"ekfac"` with `update_diagonal`, else `"kfac"`."""
        return "ekfac" if self.update_diagonal else "kfac"

    def _new_block_mapper(
        self, blocks: "OrderedDict[str, TorchOperatorGradientComposition]"
    ) -> TorchBlockMapper:
        assert self.loss is not None
        return layer_block_mapper(blocks, self.model, self.loss)

    def _fitted_curvatures(self) -> "OrderedDict[str, KroneckerFactoredCurvature]":
        if not self.is_fitted:
            raise AttributeError(f"{type(self).__name__} is not fitted: call 'fit' first.")
        result: "OrderedDict[str, KroneckerFactoredCurvature]" = OrderedDict()
        for name, block in self.block_mapper.composable_block_dict.items():
            assert isinstance(block.op, KroneckerFactoredCurvature)
            result[name] = block.op
        return result

    @property
    def kronecker_factors(self) -> Dict[str, KroneckerFactors]:
        """$A$ and $G$ of every layer (float64), after `fit` or `load_fit`."""
        return {n: op.factors for n, op in self._fitted_curvatures().items() if op.factors}

    @property
    def eigenbases(self) -> Dict[str, KroneckerEigenbasis]:
        """The eigendecompositions of the factors of every layer, after `fit` or `load_fit`."""
        return {n: op.eigenbasis for n, op in self._fitted_curvatures().items() if op.eigenbasis}

    @property
    def eigenvalues(self) -> Dict[str, torch.Tensor]:
        """The eigenvalues $s$ `(m, k)` of every layer in the Kronecker eigenbasis."""
        return {n: op.eigenvalues for n, op in self._fitted_curvatures().items()}

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


def _factored_layers(model: torch.nn.Module) -> Optional[List[str]]:
    """The trainable `Linear` / `Conv2d` layers of `model`, with one log line saying which
    other trainable modules are held fixed; None if there are no others (or no layer at all,
    for `find_layers`' error)."""
    supported, others = split_layers(model)
    if not others or not supported:
        return None
    modules = dict(model.named_modules())
    factored = Counter(type(modules.get(name, model)).__name__ for name in supported)
    shown = ", ".join(list(others)[:5]) + (", ..." if len(others) > 5 else "")
    logger.info(
        "EkfacInfluence: %d Kronecker-factored layers (%s); %d other trainable modules held "
        "fixed (other_layers='freeze'): %s (%s).",
        len(supported),
        ", ".join(f"{kind} x{count}" for kind, count in factored.items()),
        len(others),
        ", ".join(f"{kind} x{count}" for kind, count in Counter(others.values()).items()),
        shown,
    )
    return supported
