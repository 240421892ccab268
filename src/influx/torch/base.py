r"""The torch implementation of the protocols in [influx.types][influx.types].

A [TorchComposableInfluence][influx.torch.base.TorchComposableInfluence] splits the model's
parameters into blocks (see [BlockMode][influx.torch.util.BlockMode]); each block is a
[TorchOperatorGradientComposition][influx.torch.base.TorchOperatorGradientComposition] of an
operator $A_b \approx (C_b + \lambda_b I)^{-1}$ and a
[TorchGradientProvider][influx.torch.base.TorchGradientProvider] restricted to the block.
The influence of training point $z$ on test point $z'$ is the sum over blocks

$$
I(z', z) = \sum_b \langle A_b \nabla_{\theta_b} \ell(z'), \nabla_{\theta_b} \ell(z)\rangle .
$$
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, TypeVar, Union, cast

import torch
from torch.utils.data import DataLoader

from ..types import (
    Batch,
    BilinearForm,
    BlockMapper,
    ComposableInfluence,
    GradientProvider,
    InfluenceMode,
    Operator,
    OperatorGradientComposition,
    SolverDiagnostics,
    _check_mode,
)
from .functional import (
    LossFunction,
    create_matrix_jacobian_product_function,
    create_per_sample_gradient_function,
    create_per_sample_mixed_derivative_function,
    flatten_dimensions,
    get_model_parameters,
)
from .util import (
    BlockMode,
    BlockStructure,
    RegularizationType,
    block_parameters,
    regularization_by_block,
)

__all__ = [
    "TorchBatch",
    "TorchGradientProvider",
    "OperatorBilinearForm",
    "DictBilinearForm",
    "TensorOperator",
    "TensorDictOperator",
    "TorchOperatorGradientComposition",
    "TorchBlockMapper",
    "TorchComposableInfluence",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchBatch(Batch):
    """Inputs `x` and targets `y` of one batch; their first dimensions must agree."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("x", "y"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"Parameter '{name}' must be a torch.Tensor, got {type(value).__name__}."
                )
            if value.ndim == 0:
                raise ValueError(
                    f"Parameter '{name}' must have a batch dimension, got a scalar tensor."
                )
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                "Parameters 'x' and 'y' must have the same number of samples (first "
                f"dimension), got x with shape {tuple(self.x.shape)} and y with shape "
                f"{tuple(self.y.shape)}."
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device) -> "TorchBatch":
        """A batch on `device` (self is unchanged)."""
        return TorchBatch(self.x.to(device), self.y.to(device))


def _check_finite(grads: Dict[str, torch.Tensor], what: str, block: Optional[str]) -> None:
    bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
    if bad:
        where = f" in block {block!r}" if block is not None else ""
        raise ValueError(
            f"NaN or Inf in the {what}{where} for parameters {bad}: check the inputs, the "
            "loss and the model's parameters."
        )


class TorchGradientProvider(GradientProvider[TorchBatch, torch.Tensor]):
    r"""Per-sample gradients of $\ell_i(\theta) = \text{loss}(f_\theta(x_i), y_i)$ via `torch.func`.

    For parameters $\theta = (\theta_1, \dots, \theta_k)$ (all trainable parameters, or those
    in `restrict_to`) it computes

    * `grads`: $\{\theta_j: \nabla_{\theta_j} \ell_i\}$, shapes `(N, *theta_j.shape)`;
    * `flat_grads`: the same flattened and concatenated, shape `(N, P)`;
    * `mixed_grads`: $\{\theta_j: \nabla_x \nabla_{\theta_j} \ell_i\}$, shapes `(N, F, d_j)`
      with $F$ the number of input features and $d_j$ the size of $\theta_j$;
    * `flat_mixed_grads`: shape `(N, F, P)`;
    * `jacobian_prod`: $(\nabla_\theta \ell_i \cdot g_k)_{ik}$ without forming the gradients.

    Gradients containing NaN or Inf raise a `ValueError` naming the parameters.

    Args:
        model: the model $f_\theta$.
        loss: the loss function `loss(prediction, target)` with mean reduction.
        restrict_to: the parameters to differentiate with respect to, by name; None means all
            trainable parameters of the model.
        block_name: a name used in error messages.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
        block_name: Optional[str] = None,
    ):
        self.model = model
        self.loss = loss
        if restrict_to is None:
            self.params = get_model_parameters(model)
        else:
            self.params = {k: p.detach() for k, p in restrict_to.items()}
        self.block_name = block_name
        self._build_functions()

    def _build_functions(self) -> None:
        self._grad_fn = create_per_sample_gradient_function(self.model, self.loss, self.params)
        self._mixed_fn = create_per_sample_mixed_derivative_function(
            self.model, self.loss, self.params
        )
        self._jac_prod_fn = create_matrix_jacobian_product_function(
            self.model, self.loss, self.params
        )

    def to(self, device: Union[torch.device, str]) -> "TorchGradientProvider":
        """Move the model and the parameters to `device`; return self."""
        self.model.to(device)
        self.params = {name: p.to(device) for name, p in self.params.items()}
        self._build_functions()
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def input_size(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def grads(self, batch: TorchBatch) -> Dict[str, torch.Tensor]:
        result: Dict[str, torch.Tensor] = self._grad_fn(self.params, batch.x, batch.y)
        _check_finite(result, "per-sample gradients", self.block_name)
        return result

    def mixed_grads(self, batch: TorchBatch) -> Dict[str, torch.Tensor]:
        raw: Dict[str, torch.Tensor] = self._mixed_fn(self.params, batch.x, batch.y)
        n = batch.x.shape[0]
        n_features = batch.x[0].numel()
        result = {name: g.reshape(n, n_features, -1) for name, g in raw.items()}
        _check_finite(result, "per-sample mixed derivatives", self.block_name)
        return result

    def flat_grads(self, batch: TorchBatch) -> torch.Tensor:
        return flatten_dimensions(self.grads(batch).values(), shape=(len(batch), -1))

    def flat_mixed_grads(self, batch: TorchBatch) -> torch.Tensor:
        return torch.cat(list(self.mixed_grads(batch).values()), dim=-1)

    def jacobian_prod(self, batch: TorchBatch, g: torch.Tensor) -> torch.Tensor:
        if g.ndim != 2 or g.shape[1] != self.input_size:
            raise ValueError(
                f"Parameter 'g' must have shape (K, {self.input_size}), got {tuple(g.shape)}."
            )
        result: torch.Tensor = self._jac_prod_fn(self.params, batch.x, batch.y, g)
        _check_finite({"jacobian_prod": result}, "Jacobian products", self.block_name)
        return result


def _perturbation_product(
    left: torch.Tensor, right_mixed: torch.Tensor, x_shape: Tuple[int, ...]
) -> torch.Tensor:
    """$\\langle l_i, m_{jf}\\rangle$ for `left` `(N, P)` and `right_mixed` `(M, F, P)`."""
    values = torch.einsum("ip,jfp->ijf", left, right_mixed)
    return values.reshape(left.shape[0], right_mixed.shape[0], *x_shape)


class OperatorBilinearForm(BilinearForm[torch.Tensor, TorchBatch, TorchGradientProvider]):
    r"""The bilinear form $B(u, v) = \langle A u, v\rangle$ of a tensor operator $A$.

    The operator is applied to the left-hand side only: for influences, the (few) test
    gradients.
    """

    def __init__(self, operator: "TensorOperator"):
        self.operator = operator

    def to(self, device: Union[torch.device, str]) -> "OperatorBilinearForm":
        """Move the operator to `device`; return self."""
        self.operator.to(device)
        return self

    def inner_prod(self, left: torch.Tensor, right: Optional[torch.Tensor]) -> torch.Tensor:
        r"""$\langle A u_i, v_j\rangle$ for the rows of `left` and `right`, `(N_left, N_right)`."""
        right = left if right is None else right
        return self.operator.apply(left) @ right.T

    def mixed_grads_inner_prod(
        self,
        left: TorchBatch,
        right: Optional[TorchBatch],
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        right = left if right is None else right
        left_factors = self.operator.apply(gradient_provider.flat_grads(left))
        right_mixed = gradient_provider.flat_mixed_grads(right)
        return _perturbation_product(left_factors, right_mixed, tuple(right.x.shape[1:]))


OperatorBilinearFormType = TypeVar("OperatorBilinearFormType", bound=OperatorBilinearForm)


class DictBilinearForm(OperatorBilinearForm):
    r"""Bilinear form of a [TensorDictOperator][influx.torch.base.TensorDictOperator].

    Pairs gradients kept as dictionaries by parameter name, avoiding the flattening of
    gradients into one vector: $B(u, v) = \sum_k \langle (A u)_k, v_k\rangle$.
    """

    operator: "TensorDictOperator"

    def __init__(self, operator: "TensorDictOperator"):
        super().__init__(operator)

    def grads_inner_prod(
        self,
        left: TorchBatch,
        right: Optional[TorchBatch],
        gradient_provider: TorchGradientProvider,
    ) -> torch.Tensor:
        left_grads = gradient_provider.grads(left)
        right_grads = left_grads if right is None else gradient_provider.grads(right)
        applied = self.operator.apply_to_dict(left_grads)
        return self._dict_inner_prod(applied, right_grads)

    @staticmethod
    def _dict_inner_prod(
        left: Dict[str, torch.Tensor], right: Dict[str, torch.Tensor]
    ) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for key, value in left.items():
            term = value.reshape(value.shape[0], -1) @ right[key].reshape(right[key].shape[0], -1).T
            total = term if total is None else total + term
        assert total is not None
        return total


class TensorOperator(Operator[torch.Tensor, OperatorBilinearForm], ABC):
    """An operator acting on the rows of tensors whose last dimension is `input_size`.

    Subclasses implement `_apply` for a 2-D tensor `(N, input_size)`; `apply` validates the
    input and also accepts a single vector.
    """

    @property
    @abstractmethod
    def input_size(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    diagnostics: Optional[SolverDiagnostics] = None
    """What the solver reported on the last `apply` (None for operators that do not solve)."""

    @property
    def regularization(self) -> Optional[float]:
        """The regularization $\\lambda$ of the operator, if it has one.

        Setting it changes this operator in place to what `with_regularization` returns
        (reusing what does not depend on $\\lambda$)."""
        return getattr(self, "_regularization", None)

    @regularization.setter
    def regularization(self, value: Optional[float]) -> None:
        replacement = self.with_regularization(value)
        vars(self).update(vars(replacement))

    def to(self, device: Union[torch.device, str]) -> "TensorOperator":
        """Move the operator's tensors (and the model, data-dependent parts and
        preconditioner it holds) to `device`; return self."""
        from .compat import move_to_device

        return move_to_device(self, device)

    def with_regularization(self, regularization: Optional[float]) -> "TensorOperator":
        """A new operator with regularization `regularization`, reusing what does not depend
        on it (self is unchanged)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support changing its regularization."
        )

    def _validate_tensor_input(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"Parameter 'tensor' must be a torch.Tensor, got {type(tensor).__name__}."
            )
        if tensor.ndim not in (1, 2) or tensor.shape[-1] != self.input_size:
            raise ValueError(
                f"Parameter 'tensor' must have shape ({self.input_size},) or "
                f"(N, {self.input_size}) to match the operator's input size, got "
                f"{tuple(tensor.shape)}."
            )

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Apply the operator to a vector `(P,)` or to every row of a matrix `(N, P)`."""
        self._validate_tensor_input(tensor)
        tensor = tensor.to(device=self.device)
        if tensor.ndim == 1:
            return self._apply(tensor.unsqueeze(0)).squeeze(0)
        return self._apply(tensor)

    @abstractmethod
    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Apply the operator to every row of a 2-D tensor."""

    def as_bilinear_form(self) -> OperatorBilinearForm:
        return OperatorBilinearForm(self)


class TensorDictOperator(TensorOperator, ABC):
    """A tensor operator that also acts on dictionaries of tensors by parameter name.

    Inputs must match `input_dict_structure` (shapes without the batch dimension).
    """

    @property
    @abstractmethod
    def input_dict_structure(self) -> Dict[str, Tuple[int, ...]]: ...

    def _validate_mat_dict(self, mat: Dict[str, torch.Tensor]) -> None:
        structure = self.input_dict_structure
        if not isinstance(mat, dict) or list(mat) != list(structure):
            given = list(mat) if isinstance(mat, dict) else type(mat).__name__
            raise ValueError(
                f"Parameter 'mat' must be a dict with keys {list(structure)}, got {given}."
            )
        batch_sizes = {v.shape[0] for v in mat.values()}
        for key, shape in structure.items():
            if tuple(mat[key].shape[1:]) != tuple(shape):
                raise ValueError(
                    f"Parameter 'mat': entry {key!r} must have shape (N, *{tuple(shape)}), got "
                    f"{tuple(mat[key].shape)}."
                )
        if len(batch_sizes) != 1:
            raise ValueError(
                f"Parameter 'mat': all entries must share the batch dimension, got {batch_sizes}."
            )

    def apply_to_dict(self, mat: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Apply the operator to a dictionary of tensors matching `input_dict_structure`."""
        self._validate_mat_dict(mat)
        mat = {k: v.to(self.device) for k, v in mat.items()}
        return self._apply_to_dict(mat)

    def _apply_to_dict(self, mat: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        n = next(iter(mat.values())).shape[0]
        flat = flatten_dimensions(mat.values(), shape=(n, -1))
        result = self._apply(flat)
        sizes = [v[0].numel() for v in mat.values()]
        return {
            key: chunk.reshape(mat[key].shape)
            for key, chunk in zip(mat, torch.split(result, sizes, dim=1))
        }

    def as_bilinear_form(self) -> OperatorBilinearForm:
        return DictBilinearForm(self)


TorchOperatorType = TypeVar("TorchOperatorType", bound=TensorOperator)


class TorchOperatorGradientComposition(
    OperatorGradientComposition[torch.Tensor, TorchBatch, TensorOperator, TorchGradientProvider]
):
    """One block: a [TensorOperator][influx.torch.base.TensorOperator] with the gradient
    provider restricted to the same parameters.

    Args:
        op: the operator, usually $(C_b + \\lambda_b I)^{-1}$ for the block's curvature.
        gp: per-sample gradients restricted to the block.
    """

    op: TensorOperator
    gradient_provider: TorchGradientProvider

    def __init__(self, op: TensorOperator, gp: TorchGradientProvider):
        if op.input_size != gp.input_size:
            raise ValueError(
                f"Operator input size {op.input_size} does not match the gradient size "
                f"{gp.input_size} of the block."
            )
        super().__init__(op, gp)

    def to(self, device: Union[torch.device, str]) -> "TorchOperatorGradientComposition":
        """Move the operator and the gradient provider to `device`; return self."""
        self.op = self.op.to(device)
        self.gradient_provider = self.gradient_provider.to(device)
        return self

    def interactions_from_transformed_grads(
        self, left_factors: torch.Tensor, right_batch: TorchBatch, mode: InfluenceMode
    ) -> torch.Tensor:
        r"""$\langle u_i, \nabla_\theta \ell(\text{right}_j)\rangle$ for pre-computed factors $u_i$.

        With $\nabla_x \nabla_\theta \ell(\text{right}_j)$ on the right for `Perturbation`.
        """
        mode = _check_mode(mode)
        size = self.gradient_provider.input_size
        if left_factors.ndim != 2 or left_factors.shape[1] != size:
            raise ValueError(
                f"Parameter 'z_test_factors' must have shape (N, {size}), got "
                f"{tuple(left_factors.shape)}."
            )
        left_factors = left_factors.to(self.op.device)
        if mode is InfluenceMode.Up:
            return left_factors @ self.gradient_provider.flat_grads(right_batch).T
        right_mixed = self.gradient_provider.flat_mixed_grads(right_batch)
        return _perturbation_product(left_factors, right_mixed, tuple(right_batch.x.shape[1:]))

    def self_interactions_from_transformed_grads(
        self, factors: torch.Tensor, batch: TorchBatch, mode: InfluenceMode
    ) -> torch.Tensor:
        mode = _check_mode(mode)
        factors = factors.to(self.op.device)
        if mode is InfluenceMode.Up:
            return (factors * self.gradient_provider.flat_grads(batch)).sum(dim=1)
        mixed = self.gradient_provider.flat_mixed_grads(batch)
        values = torch.einsum("ip,ifp->if", factors, mixed)
        return values.reshape(len(batch), *batch.x.shape[1:])


class TorchBlockMapper(BlockMapper[torch.Tensor, TorchBatch, TorchOperatorGradientComposition]):
    """Maps computations over blocks of [TorchOperatorGradientComposition][influx.torch.base.TorchOperatorGradientComposition]."""

    composable_block_dict: "OrderedDict[str, TorchOperatorGradientComposition]"

    def to(self, device: Union[torch.device, str]) -> "TorchBlockMapper":
        """Move every block to `device`; return self."""
        for block in self.composable_block_dict.values():
            block.to(device)
        return self

    def _split_to_blocks(self, z: torch.Tensor, dim: int = -1) -> "OrderedDict[str, torch.Tensor]":
        sizes = [block.op.input_size for block in self.composable_block_dict.values()]
        if z.ndim != 2 or z.shape[dim] != sum(sizes):
            raise ValueError(
                f"Parameter 'z_test_factors' must have shape (N, {sum(sizes)}) (the number of "
                f"parameters of all blocks), got {tuple(z.shape)}."
            )
        return OrderedDict(zip(self.composable_block_dict, torch.split(z, sizes, dim=dim)))


class TorchComposableInfluence(
    ComposableInfluence[torch.Tensor, TorchBatch, DataLoader, TorchBlockMapper], ABC
):
    """Base of the torch influence models: block-wise composition of one operator per block.

    Subclasses implement `_create_block`, which builds the operator of one block from the
    training data. Everything else (fit, validation, factors, influences, block-wise
    variants, `with_regularization`) is shared.

    Args:
        model: the trained model. Its device and dtype are used for all computations.
        block_structure: a [BlockMode][influx.torch.util.BlockMode] or an
            `OrderedDict[str, List[str]]` of block names to parameter names.
        regularization: $\\lambda \\ge 0$ added to the curvature, either one float for every
            block or a dict keyed by block name (missing blocks get none).
    """

    _settings: Dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_settings(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @property
    def settings(self) -> Dict[str, Any]:
        """The constructor arguments of this model (without `model` and `loss`): they are
        saved with a fit and checked when it is loaded."""
        return dict(getattr(self, "_settings", {}))

    def __init__(
        self,
        model: torch.nn.Module,
        block_structure: BlockStructure = BlockMode.FULL,
        regularization: RegularizationType = None,
    ):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Parameter 'model' must be a torch.nn.Module, got {type(model).__name__}."
            )
        self.model = model
        self.block_structure = block_structure
        self._blocks = block_parameters(model, block_structure)
        self.regularization = regularization
        self._regularization_by_block = regularization_by_block(regularization, list(self._blocks))

    @property
    def solver_diagnostics(self) -> "OrderedDict[str, Optional[SolverDiagnostics]]":
        """Per block, what its solver reported on its most recent application (the last
        `influence_factors` or `influences` call): iterations, achieved residual and whether
        it converged. None for blocks whose operator does not solve a system."""
        if not self.is_fitted:
            return OrderedDict((name, None) for name in self.block_names)
        return OrderedDict(
            (name, block.op.diagnostics)
            for name, block in self.block_mapper.composable_block_dict.items()
        )

    @property
    def block_names(self) -> List[str]:
        """The names of the blocks, in order."""
        return list(self._blocks)

    @property
    def n_parameters(self) -> int:
        """The number of parameters over all blocks."""
        return sum(p.numel() for block in self._blocks.values() for p in block.values())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: Union[torch.device, str]) -> "TorchComposableInfluence":
        """Move the model and, if fitted, every block (operators, factorisations, gradient
        providers) to `device`; return self. Inputs are moved to the model's device on use."""
        self.model.to(device)
        if self.is_fitted:
            self.block_mapper.to(device)
        return self

    @property
    def is_thread_safe(self) -> bool:
        # torch.func.functional_call swaps the module's parameters while it runs.
        return False

    @abstractmethod
    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        """Build one block (operator and gradient provider) from the training data."""

    def _create_block_mapper(self, data: DataLoader) -> TorchBlockMapper:
        blocks = OrderedDict(
            (name, self._create_block(name, params, data, self._regularization_by_block[name]))
            for name, params in self._blocks.items()
        )
        return TorchBlockMapper(blocks)

    def _gradient_provider(
        self, loss: LossFunction, block_name: str, block_params: Dict[str, torch.nn.Parameter]
    ) -> TorchGradientProvider:
        return TorchGradientProvider(self.model, loss, block_params, block_name=block_name)

    def _create_batch(self, x: torch.Tensor, y: torch.Tensor) -> TorchBatch:
        return TorchBatch(x, y).to(self.device)

    def _concat(self, tensors: Iterable[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(list(tensors), dim=dim)

    def with_regularization(self, regularization: RegularizationType) -> "TorchComposableInfluence":
        """A copy of this model with another regularization, reusing the fitted curvature.

        Nothing that does not depend on $\\lambda$ is recomputed (e.g. the Hessian of the
        direct method, the eigenpairs of the low-rank methods). Self is unchanged.

        Args:
            regularization: a float, or a dict keyed by block name.
        """
        by_block = regularization_by_block(regularization, self.block_names)
        new = copy.copy(self)
        new.regularization = regularization
        new._settings = dict(self.settings)
        for key in ("regularization", "hessian_regularization"):
            if key in new._settings:
                new._settings[key] = regularization
        new._regularization_by_block = by_block
        if self.is_fitted:
            new.block_mapper = TorchBlockMapper(
                OrderedDict(
                    (
                        name,
                        TorchOperatorGradientComposition(
                            block.op.with_regularization(by_block[name]), block.gradient_provider
                        ),
                    )
                    for name, block in self.block_mapper.composable_block_dict.items()
                )
            )
        return new

    def save(self, path: Union[str, Path]) -> Path:
        """Save the fit (factorisations, eigenpairs, factors, ...) with the settings that
        produced it, the model's parameter shapes and a fingerprint of their values, and the
        library version. See [influx.torch.persistence][influx.torch.persistence]."""
        from .persistence import save_fit

        return save_fit(self, path)

    def load_fit(
        self, path: Union[str, Path], data: Optional[DataLoader] = None
    ) -> "TorchComposableInfluence":
        """Load a fit saved by `save` into this (unfitted or fitted) model and return self.

        The file must have been made by the same class with the same settings, for a model
        with the same parameter shapes and values. Tensors are loaded onto this model's
        device. Methods whose operators apply the curvature through the training data (CG,
        LiSSA, ...) need that data again as `data`.

        Raises:
            ValueError: for a file of another class, other settings, another model shape or
                other parameter values, or missing `data`.
        """
        from .persistence import load_fit

        return load_fit(self, path, data)

    def fit(self, data: DataLoader) -> "TorchComposableInfluence":
        """Fit the curvature of every block to the training data and return self.

        Args:
            data: an iterable of `(x, y)` batches, typically a `DataLoader`.
        """
        return cast("TorchComposableInfluence", super().fit(data))


def _recording_settings(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a constructor so that the outermost call records its arguments as settings."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: TorchComposableInfluence, *args: Any, **kwargs: Any) -> None:
        if "_settings" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            self._settings = {
                name: value
                for name, value in list(bound.arguments.items())[1:]
                if name not in ("model", "loss", "progress")
                and signature.parameters[name].kind
                not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            }
        init(self, *args, **kwargs)

    return wrapper


def __getattr__(name: str) -> object:
    # LowRankBilinearForm lives in influx.torch.low_rank (which imports this module); it is also
    # reachable here, where the reference API places it.
    if name == "LowRankBilinearForm":
        from .low_rank import LowRankBilinearForm

        return LowRankBilinearForm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
