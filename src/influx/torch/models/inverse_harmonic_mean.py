r"""Influence with the inverse harmonic mean of rank-one curvatures (DataInf)."""

from __future__ import annotations

from typing import Optional

import torch

from ..autodiff.derivatives import LossFunction
from ..composition.composable import TorchComposableInfluence
from ..composition.curvatures import ModeCurvature
from ..composition.solvers import InverseHarmonicMeanSolver
from ..curvature.operators import SecondOrderMode, check_second_order_mode
from ..data.blocks import BlockMode, BlockStructure
from ..data.validation import RegularizationType

__all__ = ["InverseHarmonicMeanInfluence"]


class InverseHarmonicMeanInfluence(TorchComposableInfluence):
    r"""Influence with the inverse harmonic mean of rank-one curvatures (DataInf).

    Replaces $(G_b + \lambda I)^{-1}$, the inverse of the damped Gauss-Newton matrix of each
    block, by the mean of the inverses of its rank-one terms,

    $$
    \frac{1}{n}\sum_{i=1}^n \left(g_i g_i^\top + \lambda I\right)^{-1}, \qquad
    g_i = \nabla_{\theta_b} \ell(x_i, y_i),
    $$

    each applied in closed form (Sherman–Morrison), see
    [InverseHarmonicMeanOperator][influx.torch.inverse.inverse_harmonic_mean.InverseHarmonicMeanOperator].
    It is an approximation that does not converge to the direct method; its error is small
    when $\lambda$ is large compared to $\|g_i\|^2$ and grows with the block size, so it is
    usually used with a layer-wise block structure. `fit` computes only $\max_i \|g_i\|^2$ (for
    the conditioning check, one pass over the data): every
    `influence_factors` / `influences` call makes one pass over the training data, and
    `with_regularization` is free.

    Args:
        model: the trained model.
        loss: the loss function (mean reduction).
        regularization: $\lambda > 0$, a float or a dict keyed by block name (every block).
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or a custom structure.
        second_order_mode: only `SecondOrderMode.GAUSS_NEWTON`: the method is defined through
            the rank-one terms of the Gauss-Newton matrix; `HESSIAN` raises a ValueError.
        progress: show a progress bar over the training batches.
        compute_dtype: the dtype of curvature, factorisations and solves; None means float32
            for a float16 / bfloat16 model and the model's dtype otherwise (see
            [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence]).
        on_nonconvergence: `"warn"` (default) or `"raise"` (an
            [IllConditionedError][influx.errors.IllConditionedError] at `fit`) when
            $\lambda$ is so small against $\max_i \|g_i\|^2$ that a term
            $g_i g_i^\top + \lambda I$ is too ill-conditioned for the compute dtype (`fit`
            makes one pass over the data to measure it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.GAUSS_NEWTON,
        progress: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
        on_nonconvergence: str = "warn",
    ):
        mode = check_second_order_mode(second_order_mode)
        if mode is not SecondOrderMode.GAUSS_NEWTON:
            raise ValueError(
                "Parameter 'second_order_mode' must be SecondOrderMode.GAUSS_NEWTON for "
                "InverseHarmonicMeanInfluence (it inverts the rank-one terms of the "
                f"Gauss-Newton matrix), got {mode!r}."
            )
        self.second_order_mode = mode
        solver = InverseHarmonicMeanSolver(progress, on_nonconvergence)
        if on_nonconvergence == "warn":  # the default: fits saved before it existed load
            self._settings.pop("on_nonconvergence", None)
        self._compose(
            model, loss, ModeCurvature(mode), solver, block_structure, regularization, compute_dtype
        )
