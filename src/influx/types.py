r"""Framework-agnostic protocols of influx.

Nothing in this module imports a numerical framework: it states *what* the pieces of an
influence computation are, and how they compose, in terms of abstract tensors.

The influence of a training point $z$ on a test point $z'$ is

$$
I(z', z) = \left\langle (H + \lambda I)^{-1} \nabla_\theta \ell(z'),
\nabla_\theta \ell(z) \right\rangle
$$

for [InfluenceMode.Up][influx.types.InfluenceMode], and the same quantity differentiated with
respect to the input features of $z$ for
[InfluenceMode.Perturbation][influx.types.InfluenceMode]. There is no minus sign and no
$1/n$ factor: a **positive** value means that up-weighting $z$ *lowers* the loss on $z'$, so
$z$ helps $z'$; a negative value means $z$ is harmful to $z'$.

The pieces:

* a [Batch][influx.types.Batch] is a pair of inputs and targets;
* a [GradientProvider][influx.types.GradientProvider] computes per-sample gradients;
* an [Operator][influx.types.Operator] applies a linear map, usually an (approximate)
  inverse of a curvature matrix, and knows how to pair gradients through it via a
  [BilinearForm][influx.types.BilinearForm];
* an [OperatorGradientComposition][influx.types.OperatorGradientComposition] joins one
  operator and one gradient provider into one *block* of parameters;
* a [BlockMapper][influx.types.BlockMapper] maps the computation over several blocks;
* a [ComposableInfluence][influx.types.ComposableInfluence] is an
  [InfluenceFunctionModel][influx.types.InfluenceFunctionModel] built from blocks.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    Generic,
    ItemsView,
    Iterable,
    Optional,
    TypeVar,
    Union,
)

from .errors import InfluxError, NotFittedException, UnsupportedInfluenceModeException

__all__ = [
    "Batch",
    "BilinearForm",
    "BlockMapper",
    "ComposableInfluence",
    "GradientProvider",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "NotFittedException",
    "Operator",
    "OperatorGradientComposition",
    "UnsupportedInfluenceModeException",
    "SolverDiagnostics",
    "InfluxError",
    "check_mode",
]

TensorType = TypeVar("TensorType")
DataLoaderType = TypeVar("DataLoaderType", bound=Iterable)
BatchType = TypeVar("BatchType", bound="Batch")
GradientProviderType = TypeVar("GradientProviderType", bound="GradientProvider")
OperatorType = TypeVar("OperatorType", bound="Operator")
CompositionType = TypeVar("CompositionType", bound="OperatorGradientComposition")
OperatorGradientCompositionType = TypeVar(
    "OperatorGradientCompositionType", bound="OperatorGradientComposition"
)
BlockMapperType = TypeVar("BlockMapperType", bound="BlockMapper")
BilinearFormType = TypeVar("BilinearFormType", bound="BilinearForm")


class InfluenceMode(str, Enum):
    """The kind of influence to compute.

    * `Up`: up-weighting a training point,
      $\\langle H^{-1}\\nabla_\\theta \\ell(z'), \\nabla_\\theta \\ell(z)\\rangle$, one value
      per (test, train) pair.
    * `Perturbation`: perturbing the features of a training point,
      $\\langle H^{-1}\\nabla_\\theta \\ell(z'), \\nabla_x \\nabla_\\theta \\ell(z)\\rangle$,
      one value per (test, train, input feature).
    """

    Up = "up"
    Perturbation = "perturbation"


@dataclass
class SolverDiagnostics:
    """What an inverse solver reports about its last application.

    Operators that solve a system (CG, LiSSA, the direct solve, ...) keep the diagnostics of
    their most recent `apply` in their `diagnostics` attribute; influence models collect them
    per block in `solver_diagnostics`.

    Attributes:
        method: the solver, e.g. `"cg"`, `"block_cg"`, `"lissa"`, `"direct/cholesky"`.
        converged: whether every right-hand side reached the tolerance.
        iterations: the number of iterations (the maximum over right-hand sides), None for
            non-iterative solvers.
        residual: the achieved residual, relative to the right-hand side's norm (the maximum
            over right-hand sides), None where not measured.
        details: further, method-specific figures (per right-hand side iterations, tolerance,
            scale, ...).
    """

    method: str
    converged: bool
    iterations: Optional[int] = None
    residual: Optional[float] = None
    details: Dict[str, Any] = field(default_factory=dict)


def check_mode(mode: Any) -> InfluenceMode:
    """Return `mode` as an [InfluenceMode][influx.types.InfluenceMode] or raise."""
    try:
        return InfluenceMode(mode)
    except ValueError:
        raise UnsupportedInfluenceModeException(mode) from None


class Batch(ABC):
    """A batch of inputs `x` and targets `y` sharing their first (batch) dimension.

    Implementations (e.g. [TorchBatch][influx.torch.composition.composable.TorchBatch]) are dataclasses with
    these two fields; this constructor stores them."""

    x: Any
    y: Any

    def __init__(self, x: Any, y: Any):
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)


class GradientProvider(Generic[BatchType, TensorType], ABC):
    r"""Computes per-sample gradients $\nabla_\theta \ell(x_i, y_i)$ of a loss."""

    @abstractmethod
    def grads(self, batch: BatchType) -> Dict[str, TensorType]:
        """Per-sample gradients by parameter name, each of shape `(N, *param.shape)`."""

    @abstractmethod
    def mixed_grads(self, batch: BatchType) -> Dict[str, TensorType]:
        r"""Per-sample mixed derivatives $\nabla_x \nabla_\theta \ell$ by parameter name."""

    @abstractmethod
    def jacobian_prod(self, batch: BatchType, g: TensorType) -> TensorType:
        r"""Products $\nabla_\theta \ell(x_i, y_i) \cdot g_k$, shape `(N, K)` for `g` `(K, P)`."""

    @abstractmethod
    def flat_grads(self, batch: BatchType) -> TensorType:
        """Per-sample gradients flattened and concatenated, shape `(N, P)`."""

    @abstractmethod
    def flat_mixed_grads(self, batch: BatchType) -> TensorType:
        """Per-sample mixed derivatives, shape `(N, F, P)` with `F` input features."""


class BilinearForm(Generic[TensorType, BatchType, GradientProviderType], ABC):
    r"""A bilinear form $B(u, v) = u^\top A v$ defined by an operator $A$."""

    @abstractmethod
    def inner_prod(self, left: TensorType, right: Optional[TensorType]) -> TensorType:
        r"""$\langle u_i, A v_j \rangle$ for all rows, shape `(N_left, N_right)`."""

    def grads_inner_prod(
        self,
        left: BatchType,
        right: Optional[BatchType],
        gradient_provider: GradientProviderType,
    ) -> TensorType:
        r"""$\langle \nabla_\theta \ell(\text{left}_i), A \nabla_\theta \ell(\text{right}_j)\rangle$.

        If `right` is None, `left` is used on both sides.
        """
        left_grads = gradient_provider.flat_grads(left)
        right_grads = None if right is None else gradient_provider.flat_grads(right)
        return self.inner_prod(left_grads, right_grads)

    @abstractmethod
    def mixed_grads_inner_prod(
        self,
        left: BatchType,
        right: Optional[BatchType],
        gradient_provider: GradientProviderType,
    ) -> TensorType:
        r"""$\langle A\nabla_\theta \ell(\text{left}_i), \nabla_x\nabla_\theta
        \ell(\text{right}_j)\rangle$, shape `(N_left, N_right, *x.shape[1:])`."""


class Operator(Generic[TensorType, BilinearFormType], ABC):
    r"""A linear map on (rows of) tensors, typically $(C + \lambda I)^{-1}$ for a curvature $C$."""

    @property
    @abstractmethod
    def input_size(self) -> int:
        """The size of the last dimension of inputs to [apply][influx.types.Operator.apply]."""

    @abstractmethod
    def apply(self, tensor: TensorType) -> TensorType:
        """Apply the operator to a vector `(P,)` or to each row of a matrix `(N, P)`."""

    @abstractmethod
    def as_bilinear_form(self) -> BilinearFormType:
        """The bilinear form that pairs gradients through this operator."""


class OperatorGradientComposition(
    Generic[TensorType, BatchType, OperatorType, GradientProviderType]
):
    """One block of parameters: an operator paired with a gradient provider.

    Args:
        op: the operator, e.g. an inverse curvature restricted to the block.
        gp: per-sample gradients restricted to the block (the attribute
            `gradient_provider`).
    """

    def __init__(self, op: OperatorType, gp: GradientProviderType):
        self.op = op
        self.gradient_provider = gp

    def interactions(
        self,
        left_batch: BatchType,
        right_batch: Optional[BatchType],
        mode: InfluenceMode,
    ) -> TensorType:
        r"""Gradient interactions through the operator.

        $\langle A \nabla_\theta \ell(\text{left}_i), \nabla_\theta \ell(\text{right}_j)\rangle$
        for `Up`, and with $\nabla_x\nabla_\theta \ell(\text{right}_j)$ on the right for
        `Perturbation`. If `right_batch` is None, `left_batch` is used on both sides.
        """
        mode = check_mode(mode)
        bilinear_form = self.op.as_bilinear_form()
        if mode is InfluenceMode.Up:
            return bilinear_form.grads_inner_prod(  # type: ignore[no-any-return]
                left_batch, right_batch, self.gradient_provider
            )
        return bilinear_form.mixed_grads_inner_prod(  # type: ignore[no-any-return]
            left_batch, right_batch, self.gradient_provider
        )

    def transformed_grads(self, batch: BatchType) -> TensorType:
        r"""$A \nabla_\theta \ell(x_i, y_i)$ for every sample, shape `(N, P_block)`."""
        return self.op.apply(self.gradient_provider.flat_grads(batch))  # type: ignore[no-any-return]

    @abstractmethod
    def interactions_from_transformed_grads(
        self, left_factors: TensorType, right_batch: BatchType, mode: InfluenceMode
    ) -> TensorType:
        """Interactions of pre-computed factors with the gradients of `right_batch`."""

    def self_interactions(self, batch: BatchType, mode: InfluenceMode) -> TensorType:
        r"""$\langle A \nabla_\theta \ell(z_i), \nabla_\theta \ell(z_i)\rangle$ for each sample
        (`Up`, shape `(N,)`), or with $\nabla_x\nabla_\theta \ell(z_i)$ on the right
        (`Perturbation`, shape `(N, *x.shape[1:])`): the diagonal of `interactions(batch, None)`
        with one factor and one gradient per sample."""
        mode = check_mode(mode)
        return self.self_interactions_from_transformed_grads(
            self.transformed_grads(batch), batch, mode
        )

    @abstractmethod
    def self_interactions_from_transformed_grads(
        self, factors: TensorType, batch: BatchType, mode: InfluenceMode
    ) -> TensorType:
        """Pair each sample's pre-computed factor with its own gradient (or mixed gradient)."""


def _sum_tensors(tensors: Iterable[TensorType]) -> TensorType:
    iterator = iter(tensors)
    total = next(iterator)
    for t in iterator:
        total = total + t  # type: ignore[operator]
    return total


class BlockMapper(Generic[TensorType, BatchType, CompositionType], ABC):
    """Maps the computation of an influence quantity over an ordered set of blocks."""

    def __init__(self, composable_block_dict: "OrderedDict[str, CompositionType]"):
        self.composable_block_dict = composable_block_dict

    def items(self) -> ItemsView[str, CompositionType]:
        """The `(block name, block)` pairs, in order."""
        return self.composable_block_dict.items()

    @abstractmethod
    def _split_to_blocks(self, z: TensorType, dim: int = -1) -> "OrderedDict[str, TensorType]":
        """Split a tensor concatenated over blocks along `dim` into blocks."""

    def transformed_grads(self, batch: BatchType) -> "OrderedDict[str, TensorType]":
        """Transformed gradients of `batch`, by block."""
        return OrderedDict(
            (name, block.transformed_grads(batch))
            for name, block in self.composable_block_dict.items()
        )

    def interactions(
        self, left_batch: BatchType, right_batch: Optional[BatchType], mode: InfluenceMode
    ) -> "OrderedDict[str, TensorType]":
        """Interactions of two batches, by block."""
        return OrderedDict(
            (name, block.interactions(left_batch, right_batch, mode))
            for name, block in self.composable_block_dict.items()
        )

    def interactions_from_transformed_grads(
        self,
        left_factors: Union[TensorType, "OrderedDict[str, TensorType]"],
        right_batch: BatchType,
        mode: InfluenceMode,
    ) -> "OrderedDict[str, TensorType]":
        """Interactions of pre-computed factors (a tensor or a dict by block) with a batch."""
        factors = self._to_block_dict(left_factors)
        return OrderedDict(
            (name, block.interactions_from_transformed_grads(factors[name], right_batch, mode))
            for name, block in self.composable_block_dict.items()
        )

    def self_interactions(
        self, batch: BatchType, mode: InfluenceMode
    ) -> "OrderedDict[str, TensorType]":
        """Self-interactions of the samples of `batch`, by block."""
        return OrderedDict(
            (name, block.self_interactions(batch, mode))
            for name, block in self.composable_block_dict.items()
        )

    def generate_transformed_grads(self, batch: BatchType) -> Generator[TensorType, None, None]:
        """Yield the transformed gradients of `batch`, block by block."""
        for block in self.composable_block_dict.values():
            yield block.transformed_grads(batch)

    def generate_interactions(
        self, left_batch: BatchType, right_batch: Optional[BatchType], mode: InfluenceMode
    ) -> Generator[TensorType, None, None]:
        """Yield the interactions of two batches, block by block."""
        for block in self.composable_block_dict.values():
            yield block.interactions(left_batch, right_batch, mode)

    def generate_interactions_from_transformed_grads(
        self,
        left_factors: Union[TensorType, "OrderedDict[str, TensorType]"],
        right_batch: BatchType,
        mode: InfluenceMode,
    ) -> Generator[TensorType, None, None]:
        """Yield the interactions of pre-computed factors with a batch, block by block."""
        factors = self._to_block_dict(left_factors)
        for name, block in self.composable_block_dict.items():
            yield block.interactions_from_transformed_grads(factors[name], right_batch, mode)

    def summed_interactions(
        self, left_batch: BatchType, right_batch: Optional[BatchType], mode: InfluenceMode
    ) -> TensorType:
        """The interactions of two batches summed over blocks (a mapper may accumulate them
        without holding those of every block)."""
        return _sum_tensors(self.generate_interactions(left_batch, right_batch, mode))

    def summed_interactions_from_transformed_grads(
        self,
        left_factors: Union[TensorType, "OrderedDict[str, TensorType]"],
        right_batch: BatchType,
        mode: InfluenceMode,
    ) -> TensorType:
        """The interactions of pre-computed factors with a batch, summed over blocks."""
        blocks = self.generate_interactions_from_transformed_grads(left_factors, right_batch, mode)
        return _sum_tensors(blocks)

    def _to_block_dict(
        self, factors: Union[TensorType, "OrderedDict[str, TensorType]"]
    ) -> "OrderedDict[str, TensorType]":
        if isinstance(factors, dict):
            expected = list(self.composable_block_dict)
            if list(factors) != expected:
                raise ValueError(
                    f"Parameter 'z_test_factors' must be keyed by the blocks {expected}, "
                    f"got keys {list(factors)}."
                )
            return OrderedDict(factors)
        return self._split_to_blocks(factors)


class InfluenceFunctionModel(Generic[TensorType, DataLoaderType], ABC):
    r"""The user-facing influence model.

    After [fit][influx.types.InfluenceFunctionModel.fit] on the training data it computes

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
        """Whether [fit][influx.types.InfluenceFunctionModel.fit] has been called."""

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
        return _sum_tensors(tensors)

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
