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
* a [BlockMapper][influx.types.BlockMapper] maps the computation over several blocks.

The influence models themselves
([InfluenceFunctionModel][influx.base_influence_function_model.InfluenceFunctionModel] and
[ComposableInfluence][influx.base_influence_function_model.ComposableInfluence], built from
blocks) are in [influx.base_influence_function_model][influx.base_influence_function_model].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import (
    Any,
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
    "GradientProvider",
    "InfluenceMode",
    "NotFittedException",
    "Operator",
    "OperatorGradientComposition",
    "UnsupportedInfluenceModeException",
    "SolverDiagnostics",
    "InfluxError",
    "check_mode",
    "TOKEN_AXES",
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
        regularization: the $\\lambda$ of the system solved (the value `"auto"` chose, if
            so), None if none.
        condition_number: the solver's estimate of the condition number of what it inverts
            (the ratio of the largest to the smallest absolute eigenvalue of $C + \\lambda I$),
            None where not estimated.
    """

    method: str
    converged: bool
    iterations: Optional[int] = None
    residual: Optional[float] = None
    details: Dict[str, Any] = field(default_factory=dict)
    regularization: Optional[float] = None
    condition_number: Optional[float] = None


TOKEN_AXES = {"test": 1, "train": 2}
"""The token axis of per-token influences, by side: `(N_test, T_test, N)` for the test
tokens, `(N_test, N, T_train)` for the training tokens."""


def check_mode(mode: Any) -> InfluenceMode:
    """Return `mode` as an [InfluenceMode][influx.types.InfluenceMode] or raise."""
    try:
        return InfluenceMode(mode)
    except ValueError:
        raise UnsupportedInfluenceModeException(mode) from None


class Batch(ABC):
    """A batch of inputs `x` and targets `y` sharing their first (batch) dimension.

    Implementations (e.g. [TorchBatch][influx.torch.data.batches.TorchBatch]) are dataclasses with
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


def sum_tensors(tensors: Iterable[TensorType]) -> TensorType:
    """The sum of a non-empty iterable of tensors."""
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
        return sum_tensors(self.generate_interactions(left_batch, right_batch, mode))

    def summed_interactions_from_transformed_grads(
        self,
        left_factors: Union[TensorType, "OrderedDict[str, TensorType]"],
        right_batch: BatchType,
        mode: InfluenceMode,
    ) -> TensorType:
        """The interactions of pre-computed factors with a batch, summed over blocks."""
        blocks = self.generate_interactions_from_transformed_grads(left_factors, right_batch, mode)
        return sum_tensors(blocks)

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
