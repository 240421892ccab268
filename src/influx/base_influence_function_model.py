r"""The abstract influence models, at the module path of the reference API
(`base_influence_function_model`).

An [InfluenceFunctionModel][influx.base_influence_function_model.InfluenceFunctionModel] is
what a user fits and asks for influences; a
[ComposableInfluence][influx.base_influence_function_model.ComposableInfluence] is one built
from blocks of parameters, each an operator with its gradients (the protocols of
[influx.types][influx.types]). Importing this module does not import a numerical framework.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Callable, Generic, Iterable, Optional

from .errors import NotFittedException, NotImplementedLayerRepresentationException
from .types import (
    BatchType,
    BlockMapperType,
    DataLoaderType,
    InfluenceMode,
    TensorType,
    UnsupportedInfluenceModeException,
    check_mode,
    sum_tensors,
)

__all__ = [
    "ComposableInfluence",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "NotFittedException",
    "NotImplementedLayerRepresentationException",
    "UnsupportedInfluenceModeException",
]


class InfluenceFunctionModel(Generic[TensorType, DataLoaderType], ABC):
    r"""The user-facing influence model.

    After [fit][influx.base_influence_function_model.InfluenceFunctionModel.fit] on the training data it computes

    * influence factors $(H + \lambda I)^{-1} \nabla_\theta \ell(z')$,
    * influences $I(z', z) = \langle (H + \lambda I)^{-1} \nabla_\theta \ell(z'),
      \nabla_\theta \ell(z) \rangle$ (`Up`), or with $\nabla_x \nabla_\theta \ell(z)$ on the
      right (`Perturbation`).

    A positive influence means the training point helps (lowers the loss on) the test point.
    """

    @property
    def n_parameters(self) -> int:
        """The number of parameters the influences are taken with respect to."""
        raise NotImplementedError(f"{type(self).__name__} does not report n_parameters.")

    @property
    @abstractmethod
    def is_thread_safe(self) -> bool:
        """Whether one fitted instance may be used from several threads at once."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether [fit][influx.base_influence_function_model.InfluenceFunctionModel.fit] has been called."""

    @abstractmethod
    def fit(self, data: DataLoaderType) -> "InfluenceFunctionModel":
        """Fit the model to the training data and return it."""

    @staticmethod
    def fit_required(method: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: raise [NotFittedException][influx.types.NotFittedException] before fit."""

        @functools.wraps(method)
        def wrapper(self: "InfluenceFunctionModel", *args: Any, **kwargs: Any) -> Any:
            if not self.is_fitted:
                raise NotFittedException(type(self))
            return method(self, *args, **kwargs)

        return wrapper

    @abstractmethod
    def influence_factors(self, x: TensorType, y: TensorType) -> TensorType:
        r"""$(H + \lambda I)^{-1} \nabla_\theta \ell(x_i, y_i)$ per sample, shape `(N, P)`."""

    @abstractmethod
    def influences(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: Optional[TensorType] = None,
        y: Optional[TensorType] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        r"""Influences of `(x, y)` on `(x_test, y_test)`.

        Entry `(i, j)` is
        $\langle (H + \lambda I)^{-1}\nabla_\theta \ell(z'_i), \nabla_\theta \ell(z_j)\rangle$
        for `Up` (shape `(N_test, N)`), and
        $\langle (H + \lambda I)^{-1}\nabla_\theta \ell(z'_i),
        \nabla_x\nabla_\theta \ell(z_j)\rangle$ for `Perturbation`
        (shape `(N_test, N, *x.shape[1:])`). Without `x` and `y`, the test data is used on both
        sides (a symmetric test-by-test matrix for `Up`).
        """

    @abstractmethod
    def influences_from_factors(
        self,
        z_test_factors: TensorType,
        x: TensorType,
        y: TensorType,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        """Influences of `(x, y)` from pre-computed test factors (same values as `influences`)."""


class ComposableInfluence(
    InfluenceFunctionModel[TensorType, DataLoaderType],
    Generic[TensorType, BatchType, DataLoaderType, BlockMapperType],
    ABC,
):
    """An influence model assembled from blocks of parameters.

    Subclasses say how to build one block from the training data
    (`_create_block_mapper`); fitting,
    validation and the per-block and summed influence quantities come from here.
    """

    block_mapper: BlockMapperType

    def __init__(self) -> None:
        self._fitted = False

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def fit(self, data: DataLoaderType) -> "ComposableInfluence":
        self.block_mapper = self._create_block_mapper(data)
        self._fitted = True
        return self

    @abstractmethod
    def _create_block_mapper(self, data: DataLoaderType) -> BlockMapperType:
        """Build the block mapper (all blocks) from the training data."""

    @abstractmethod
    def _create_batch(self, x: TensorType, y: TensorType) -> BatchType:
        """Validate and wrap a pair of tensors as a batch."""

    def _create_test_batch(self, x: TensorType, y: TensorType) -> BatchType:
        """Validate and wrap test inputs and targets as a batch (the test side of influences,
        where a task's measurement replaces the training loss); by default `_create_batch`."""
        return self._create_batch(x, y)

    @abstractmethod
    def _concat(self, tensors: Iterable[TensorType], dim: int) -> TensorType:
        """Concatenate tensors along `dim`."""

    @staticmethod
    def _sum(tensors: Iterable[TensorType]) -> TensorType:
        return sum_tensors(tensors)

    def _test_and_train_batches(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: Optional[TensorType],
        y: Optional[TensorType],
    ) -> "tuple[BatchType, Optional[BatchType]]":
        if (x is None) != (y is None):
            missing, given = ("y", "x") if y is None else ("x", "y")
            raise ValueError(
                f"Parameter '{missing}' is required when '{given}' is given: pass both training "
                f"inputs and targets, or neither to compute test-by-test influences."
            )
        left = self._create_test_batch(x_test, y_test)
        right = None if x is None else self._create_batch(x, y)  # type: ignore[arg-type]
        return left, right

    @InfluenceFunctionModel.fit_required
    def influence_factors(self, x: TensorType, y: TensorType) -> TensorType:
        blocks = self.block_mapper.generate_transformed_grads(self._create_test_batch(x, y))
        return self._concat(blocks, dim=1)

    @InfluenceFunctionModel.fit_required
    def influence_factors_by_block(
        self, x: TensorType, y: TensorType
    ) -> "OrderedDict[str, TensorType]":
        r"""Block-wise $(H_b + \lambda_b I)^{-1} \nabla_{\theta_b} \ell(x_i, y_i)$."""
        return self.block_mapper.transformed_grads(self._create_test_batch(x, y))

    @InfluenceFunctionModel.fit_required
    def influences(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: Optional[TensorType] = None,
        y: Optional[TensorType] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        mode = check_mode(mode)
        left, right = self._test_and_train_batches(x_test, y_test, x, y)
        return self.block_mapper.summed_interactions(left, right, mode)  # type: ignore[no-any-return]

    @InfluenceFunctionModel.fit_required
    def influences_by_block(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: Optional[TensorType] = None,
        y: Optional[TensorType] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "OrderedDict[str, TensorType]":
        """Influences (see `influences`) restricted to each block, by block name.

        The sum over blocks equals `influences`.
        """
        mode = check_mode(mode)
        left, right = self._test_and_train_batches(x_test, y_test, x, y)
        return self.block_mapper.interactions(left, right, mode)

    @InfluenceFunctionModel.fit_required
    def self_influences(
        self, x: TensorType, y: TensorType, mode: InfluenceMode = InfluenceMode.Up
    ) -> TensorType:
        r"""The self-influence $I(z_i, z_i)$ of every sample, the diagonal of
        `influences(x, y)` without forming the $N \times N$ matrix.

        $I(z_i, z_i) = \nabla_\theta \ell(z_i)^\top (C + \lambda I)^{-1} \nabla_\theta \ell(z_i)$,
        shape `(N,)` for `Up`; for `Perturbation` the right gradient is the mixed derivative
        and the shape `(N, *x.shape[1:])`. Large self-influence marks points the model has
        to bend to fit (outliers, mislabeled samples).
        """
        mode = check_mode(mode)
        batch = self._create_batch(x, y)
        return self._sum(self.block_mapper.self_interactions(batch, mode).values())

    @InfluenceFunctionModel.fit_required
    def self_influences_by_block(
        self, x: TensorType, y: TensorType, mode: InfluenceMode = InfluenceMode.Up
    ) -> "OrderedDict[str, TensorType]":
        """Self-influences (see `self_influences`) restricted to each block."""
        mode = check_mode(mode)
        return self.block_mapper.self_interactions(self._create_batch(x, y), mode)

    @InfluenceFunctionModel.fit_required
    def influences_from_factors(
        self,
        z_test_factors: TensorType,
        x: TensorType,
        y: TensorType,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        mode = check_mode(mode)
        return self.block_mapper.summed_interactions_from_transformed_grads(  # type: ignore[no-any-return]
            z_test_factors, self._create_batch(x, y), mode
        )

    @InfluenceFunctionModel.fit_required
    def influences_from_factors_by_block(
        self,
        z_test_factors: "OrderedDict[str, TensorType]",
        x: TensorType,
        y: TensorType,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> "OrderedDict[str, TensorType]":
        """Block-wise influences from block-wise pre-computed factors."""
        mode = check_mode(mode)
        return self.block_mapper.interactions_from_transformed_grads(
            z_test_factors, self._create_batch(x, y), mode
        )
