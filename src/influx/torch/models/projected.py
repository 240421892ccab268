r"""Influence of projected gradients: the curvature built and solved in a $k$-dimensional space."""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch.utils.data import DataLoader

import torch

from ..autodiff.derivatives import LossOrTask
from ..autodiff.model_call import is_task
from ..composition.block_mapper import TorchBlockMapper, TorchOperatorGradientComposition
from ..composition.composable import TorchComposableInfluence
from ..composition.solvers import DirectSolver
from ..curvature.operators import SecondOrderMode
from ..data.batches import iterate_batches
from ..data.blocks import BlockMode, BlockStructure
from ..data.validation import RegularizationType
from ..gradients.provider import TorchGradientProvider
from ..projection.distortion import DISTORTION_THRESHOLD, DistortionEstimate, estimate_distortion
from ..projection.gradients import (
    IdentityOperator,
    ProjectedCurvature,
    ProjectedGradientProvider,
)
from ..projection.projections import PROJECTIONS, BlockProjection

__all__ = ["ProjectedInfluence"]

logger = logging.getLogger(__name__)


class ProjectedInfluence(TorchComposableInfluence):
    r"""Influence through random projections of the per-sample gradients (TRAK / LoGra style).

    Every block's per-sample gradients are projected to $k$ dimensions,
    $\tilde g = P_b \nabla_{\theta_b}\ell(z)$, and influence is computed exactly there:

    $$
    I(z', z) = \sum_b \tilde g'^\top_b \big(P_b C_b P_b^\top + \lambda_b I\big)^{-1} \tilde g_b ,
    $$

    with $C_b$ the empirical Fisher (`GAUSS_NEWTON`) or the generalized Gauss-Newton matrix,
    formed only as a $k \times k$ matrix in one pass over the data and factorised once. With
    `projection="kronecker"` (the default) the gradient of every `Linear` / `Conv2d` layer is
    projected by $P_{out} \otimes P_{in}$ from the layer's inputs and output gradients, never
    forming a per-sample gradient; the other parameters, and all parameters with `"gaussian"`
    or `"rademacher"`, are projected densely in chunks. See
    [influx.torch.projection.projections][influx.torch.projection.projections] for the formulas.

    Memory: $k^2$ per block for the curvature and, per batch, the layers' inputs and output
    gradients and $N k$ projected gradients, whatever the number of parameters (for the
    Kronecker projection). With a square orthogonal projection (`projection_dim` at least the
    number of parameters, `orthogonal=True`, the default) the result is that of
    [DirectInfluence][influx.torch.models.direct.DirectInfluence] with the same curvature; as
    $k$ grows it approaches it.

    **Default dimension.** `projection_dim=None` (the default) gives every block of $p_b$
    parameters $k_b = \min(p_b, \max(1024, \min(8192, \lceil 2\sqrt{p_b}\rceil)))$
    ([default_projection_dim][influx.torch.projection.projections.default_projection_dim]):
    1024 up to about 262 k parameters, 2098 at 1.1 M, 6694 at 11.2 M (ResNet-18; the
    $k \times k$ curvature is then 358 MB in float64), 8192 from 17 M on.

    **Distortion estimate.** `fit` measures how much the projection distorts influence on
    the first `distortion_samples` training points (exact per-sample gradients: see
    [influx.torch.projection.distortion][influx.torch.projection.distortion] for the math and
    the cost) and reports it per block in `projection_distortion` and in the `details` of
    `solver_diagnostics` (`"projection_distortion"`, `"suggested_projection_dim"`). When a
    block's estimate is above
    [DISTORTION_THRESHOLD][influx.torch.projection.distortion.DISTORTION_THRESHOLD] a warning
    (one per fit) says that the ranking is unreliable and which `projection_dim` should fix
    it. The estimate is not saved: after `load_fit` it is None.

    The projection is a function of `seed`, the block names and the parameter shapes: it is
    regenerated, not stored, by `load_fit`. Influence factors, `influences_from_factors` and
    [the gradient store][influx.torch.workflows.gradient_store] work in the projected space (factors
    have `factor_size` columns, not `n_parameters`).

    Batches may be structured (dicts, tuples, `Mapping`s such as a `BatchEncoding`, loaders of
    Hugging Face collator dicts) and the loss a [Task][influx.torch.data.task.Task], as for every
    model: the Kronecker layers' inputs and output gradients are recorded from whatever forward
    pass the loss or the task makes, and the test side differentiates the task's
    `measurement`. The generalized Gauss-Newton curvature needs a loss function
    `loss(outputs, y)`.

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction, or a
            [Task][influx.torch.data.task.Task] (with `second_order_mode=GAUSS_NEWTON`).
        projection_dim: $k$, the projected dimension of every block (capped at its number
            of parameters; a Kronecker block may get slightly fewer, see `projected_sizes`);
            None (the default): the rule above, which grows with the block's size.
        projection: `"kronecker"`, `"gaussian"` or `"rademacher"`.
        second_order_mode: `GAUSS_NEWTON` (the empirical Fisher) or
            `GENERALIZED_GAUSS_NEWTON`.
        regularization: $\lambda \ge 0$, a number for all blocks or a dict naming every block;
            `"auto"` (the default) is $\operatorname{tr}(C_b) / P_b$ per block (0.1 of it for Kronecker-factored curvatures), None means
            none (see [influx.torch.inverse.damping][influx.torch.inverse.damping]).
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or an
            `OrderedDict[str, List[str]]`.
        seed: the seed of the random projections (an int: the projection must be the same
            when a fit is loaded).
        orthogonal: make the rows of every random matrix orthogonal (scaled so that
            $\mathbb{E}[P^\top P] = I$), which makes the projection of full dimension exact and
            is more accurate at every $k$ (see `benchmarks/README.md`); a dense projection is
            orthogonalised only if it fits in `max_cache_mb`.
        max_cache_mb: a dense projection up to this size (in float64) is generated once per
            fit and kept; of a larger one, the column chunks within the budget are kept and
            the others generated again for every sub-batch, with a warning (see
            [DenseProjection][influx.torch.projection.projections.DenseProjection]).
        distortion_samples: $m$, the training points of the distortion estimate (their
            exact per-sample gradients are held: $m p$ numbers, at most $2^{28}$, so fewer
            points on blocks of over 8 M parameters, never fewer than 8); 0 skips it.

    Example:
        ```python
        model = ProjectedInfluence(net, F.cross_entropy, projection_dim=4096, regularization=0.01)
        model.fit(train_loader)
        values = model.influences(x_test, y_test, x_train, y_train)
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        projection_dim: Optional[int] = None,
        projection: str = "kronecker",
        second_order_mode: SecondOrderMode = SecondOrderMode.GAUSS_NEWTON,
        regularization: RegularizationType = "auto",
        block_structure: BlockStructure = BlockMode.FULL,
        seed: int = 0,
        orthogonal: bool = True,
        max_cache_mb: float = 256.0,
        distortion_samples: int = 32,
    ):
        if not (is_task(loss) or callable(loss)):
            raise TypeError(
                "Parameter 'loss' must be a loss function loss(outputs, targets) or an "
                f"influx.torch.Task, got {type(loss).__name__}."
            )
        if projection_dim is not None and (
            isinstance(projection_dim, bool) or not isinstance(projection_dim, int)
        ):
            raise TypeError(
                "Parameter 'projection_dim' must be an int or None, got "
                f"{type(projection_dim).__name__}."
            )
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"Parameter 'projection_dim' must be >= 1, got {projection_dim}.")
        if projection not in PROJECTIONS:
            raise ValueError(
                f"Parameter 'projection' must be one of {list(PROJECTIONS)}, got {projection!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(
                f"Parameter 'seed' must be an int (the projection is regenerated from it when a "
                f"fit is loaded), got {type(seed).__name__}."
            )
        if isinstance(max_cache_mb, bool) or not isinstance(max_cache_mb, (int, float)):
            raise TypeError(
                f"Parameter 'max_cache_mb' must be a number, got {type(max_cache_mb).__name__}."
            )
        if isinstance(distortion_samples, bool) or not isinstance(distortion_samples, int):
            raise TypeError(
                "Parameter 'distortion_samples' must be an int, got "
                f"{type(distortion_samples).__name__}."
            )
        if distortion_samples != 0 and distortion_samples < 4:
            raise ValueError(
                "Parameter 'distortion_samples' must be 0 (no estimate) or at least 4, got "
                f"{distortion_samples}."
            )
        self.distortion_samples = distortion_samples
        self._distortion: Dict[str, Optional[DistortionEstimate]] = {}
        curvature = ProjectedCurvature(
            second_order_mode, projection_dim, projection, seed, bool(orthogonal), max_cache_mb
        )
        curvature.check_loss(loss)
        self.second_order_mode = curvature.mode
        self._compose(model, loss, curvature, DirectSolver(), block_structure, regularization)

    def _gradient_provider(
        self, block_name: str, block_params: Dict[str, torch.nn.Parameter]
    ) -> TorchGradientProvider:
        if self.loss is None:  # pragma: no cover - the constructor sets it
            raise ValueError("Parameter 'loss' is required for per-sample gradients.")
        assert isinstance(self.curvature, ProjectedCurvature)
        return self.curvature.gradient_provider(self.model, self.loss, block_name, block_params)

    def _create_block_mapper(self, data: DataLoader) -> TorchBlockMapper:
        mapper = super()._create_block_mapper(data)
        self._distortion = {name: None for name in self._blocks}
        if self.distortion_samples:
            self._estimate_distortion(mapper, data)
        return mapper

    def _estimate_distortion(self, mapper: TorchBlockMapper, data: DataLoader) -> None:
        """Estimate every block's distortion, record it in the block's diagnostics and warn
        once for the blocks above the threshold."""
        unreliable = []
        for name, block in mapper.composable_block_dict.items():
            provider = block.gradient_provider
            assert isinstance(provider, ProjectedGradientProvider)
            estimate = estimate_distortion(
                provider,
                iterate_batches(data, self.device),
                getattr(block.op, "regularization", None),
                self.distortion_samples,
            )
            self._distortion[name] = estimate
            diagnostics = getattr(block.op, "diagnostics", None)
            if estimate is not None and diagnostics is not None:
                diagnostics.details["projection_distortion"] = estimate.distortion
                diagnostics.details["suggested_projection_dim"] = estimate.suggested_dim
            if estimate is not None and not estimate.reliable:
                unreliable.append((name, estimate))
        if unreliable:
            logger.warning(
                "ProjectedInfluence: the projection distorts influence too much for a reliable "
                "ranking (estimated relative error above %.2f): %s.",
                DISTORTION_THRESHOLD,
                "; ".join(
                    f"block {name!r}: {e.distortion:.2f} (on {e.samples} training points) at "
                    f"k = {e.projection_dim} of "
                    f"{e.n_parameters} parameters, use projection_dim={e.suggested_dim}"
                    for name, e in unreliable
                ),
            )

    def load_fit(
        self, path: Union[str, Path], data: Optional[DataLoader] = None
    ) -> "ProjectedInfluence":
        """As [load_fit][influx.torch.composition.composable.TorchComposableInfluence.load_fit];
        the distortion estimate is not saved, so it is None afterwards."""
        super().load_fit(path, data)
        self._distortion = {}
        return self

    @property
    def projection_distortion(self) -> Dict[str, Optional[DistortionEstimate]]:
        """The distortion estimate of every block from the last `fit` (None where not
        estimated: before `fit`, after `load_fit`, with `distortion_samples=0`, or with fewer
        than 4 training points); see
        [influx.torch.projection.distortion][influx.torch.projection.distortion]."""
        return {name: self._distortion.get(name) for name in self._blocks}

    @property
    def projections(self) -> Dict[str, BlockProjection]:
        """The random projection of every block, by name (built once, when first needed)."""
        return {
            name: self._gradient_provider(name, params).projection  # type: ignore[attr-defined]
            for name, params in self._blocks.items()
        }

    @property
    def projected_sizes(self) -> Dict[str, int]:
        """The projected dimension of every block, by name."""
        return {
            name: self._gradient_provider(name, params).input_size
            for name, params in self._blocks.items()
        }

    @property
    def factor_size(self) -> int:
        """The width of the influence factors and projected gradients: the sum of
        `projected_sizes`."""
        return sum(self.projected_sizes.values())

    @TorchComposableInfluence.fit_required
    def projected_gradients(self, x: Any, y: Any, measurement: bool = False) -> torch.Tensor:
        r"""$P_b \nabla_{\theta_b} \ell(x_i, y_i)$ of every block, concatenated: `(N, factor_size)`.

        Args:
            x: inputs, a tensor or a structure of tensors.
            y: targets.
            measurement: the gradients of a task's measurement $m$ instead of its loss
                $\ell$ (the test side of the influence; the same for a loss function).
        """
        if not isinstance(measurement, bool):
            raise TypeError(
                f"Parameter 'measurement' must be a bool, got {type(measurement).__name__}."
            )
        batch = self._create_test_batch(x, y) if measurement else self._create_batch(x, y)
        blocks = self.block_mapper.composable_block_dict.values()
        return torch.cat([block.gradient_provider.flat_grads(batch) for block in blocks], dim=1)

    def gradient_model(self, preconditioned: bool = False) -> "ProjectedInfluence":
        r"""A copy of this fitted model whose influence factors are the training side of the
        influence: the projected gradients $P_b \nabla_{\theta_b} \ell$ of the training loss
        (the identity as operator), or with `preconditioned` the solved
        $(P_b C_b P_b^\top + \lambda I)^{-1} P_b \nabla_{\theta_b} \ell$. A task's
        measurement is not used. Give it to a calculator to compute (and store) training
        gradients chunk by chunk.

        Args:
            preconditioned: keep the fitted operator instead of the identity.
        """
        if not self.is_fitted:
            from ...errors import NotFittedException

            raise NotFittedException(type(self))
        new = copy.copy(self)
        new.block_mapper = TorchBlockMapper(
            OrderedDict(
                (
                    name,
                    TorchOperatorGradientComposition(
                        block.op
                        if preconditioned
                        else IdentityOperator(block.op.input_size, self.dtype, self.device),
                        block.gradient_provider.training_side_copy(),  # type: ignore[attr-defined]
                    ),
                )
                for name, block in self.block_mapper.composable_block_dict.items()
            )
        )
        return new
