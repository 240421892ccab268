r"""Curvature specifications: which curvature $C_b$ a block is fitted with.

A [Curvature][influx.torch.composition.curvatures.Curvature] decides the blocks it is defined on
and fits one operator $C_b$ per block: [ModeCurvature][influx.torch.composition.curvatures.ModeCurvature]
(the Hessian, the empirical Fisher `GAUSS_NEWTON`, the generalized Gauss-Newton matrix
$J^\top H_{out} J$) or [KroneckerCurvature][influx.torch.composition.curvatures.KroneckerCurvature]
(K-FAC / EK-FAC factors of the empirical Fisher, one block per layer).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Dict, Iterable, Optional, Sequence

import torch

from ..autodiff.derivatives import LossOrTask
from ..curvature.batch_operation import GaussNewtonBatchOperation
from ..curvature.operators import (
    PrecomputedGaussNewtonOperator,
    SecondOrderMode,
    check_second_order_mode,
    curvature_operator,
)
from ..curvature.tensor_operator import TensorOperator
from ..data.blocks import BlockStructure, block_parameters
from ..kfac.factors import fit_kronecker_curvature, validate_fisher
from ..kfac.layers import find_layers
from ..kfac.operators import KroneckerFactoredCurvature

__all__ = ["Curvature", "ModeCurvature", "KroneckerCurvature"]

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
                weight_transposed=spec.weight_transposed,
            )
        return result
