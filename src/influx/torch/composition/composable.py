r"""Composition: influence models made of blocks, each an operator with its gradients.

A [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence] splits the model's
parameters into blocks (see [BlockMode][influx.torch.data.blocks.BlockMode]); each block is a
[TorchOperatorGradientComposition][influx.torch.composition.block_mapper.TorchOperatorGradientComposition] of an
operator $A_b \approx (C_b + \lambda_b I)^{-1}$ and a
[TorchGradientProvider][influx.torch.gradients.provider.TorchGradientProvider] restricted to the block.
The operator comes from a [Curvature][influx.torch.composition.curvatures.Curvature] and a
[Solver][influx.torch.composition.solvers.Solver]. The influence of training point $z$ on test point
$z'$ is the sum over blocks

$$
I(z', z) = \sum_b \langle A_b \nabla_{\theta_b} \ell(z'), \nabla_{\theta_b} \ell(z)\rangle .
$$

One block and the map over blocks are in
[influx.torch.composition.block_mapper][influx.torch.composition.block_mapper].
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from abc import ABC
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union, cast

from torch.utils.data import DataLoader

import torch

from ...base_influence_function_model import ComposableInfluence
from ...errors import NonFiniteCurvatureError, NotFittedException
from ...types import SolverDiagnostics
from ..autodiff.derivatives import LossOrTask
from ..autodiff.model_call import is_task
from ..data.batches import TorchBatch
from ..data.blocks import BlockMode, BlockStructure, block_parameters
from ..data.preparation import model_batch, model_data, perturbation_shape
from ..data.regularization import regularization_by_block
from ..data.state import StateContext
from ..data.validation import (
    RegularizationType,
    resolve_compute_dtype,
    takes_class_indices,
)
from ..gradients.provider import TorchGradientProvider
from .block_mapper import TorchBlockMapper, TorchOperatorGradientComposition
from .chunking import ChunkedInfluences
from .curvatures import Curvature
from .fit_checks import (
    check_first_batch,
    check_test_gradients,
    check_unchanged,
    non_finite_error,
    non_finite_state,
    tensor_versions,
)
from .heads import SplitInfluences
from .persistence import (
    check_fit_header,
    fit_contents,
    read_fit,
    restore_operators,
    write_fit,
)
from .solvers import Solver, block_diagnostics, regularization_in_use
from .solvers import resolve_auto_regularization as resolve_auto

__all__ = ["TorchComposableInfluence"]

logger = logging.getLogger(__name__)


class TorchComposableInfluence(
    SplitInfluences,
    ChunkedInfluences,
    ComposableInfluence[torch.Tensor, TorchBatch, DataLoader, TorchBlockMapper],
    ABC,
):
    """Base of the torch influence models: block-wise composition of one operator per block.

    Subclasses implement `_create_block`, which builds the operator of one block from the
    training data. Everything else (fit, validation, factors, influences, block-wise
    variants, `with_regularization`) is shared.

    Args:
        model: the trained model. Its device and dtype are used for all computations.
        block_structure: a [BlockMode][influx.torch.data.blocks.BlockMode] or an
            `OrderedDict[str, List[str]]` of block names to parameter names.
        regularization: $\\lambda$ per block, one value or a dict naming every block: a number,
            `"auto"` ([influx.torch.inverse.damping][influx.torch.inverse.damping]) or None.
        compute_dtype: the dtype of gradients, curvature, factorisations and solves. None
            means float32 for a float16 / bfloat16 model and the model's dtype otherwise.
            When it differs from the model's dtype, a copy of the model with parameters in
            `compute_dtype` is used for every computation (`model`; the given module is
            `original_model`), and floating inputs and targets are converted to it.
    """

    _settings: Dict[str, Any]
    _arguments: Dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_settings(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @property
    def settings(self) -> Dict[str, Any]:
        """The constructor arguments of this model (without `model` and `loss`): they are
        saved with a fit and checked when it is loaded."""
        return dict(getattr(self, "_settings", {}))

    curvature: Optional[Curvature] = None
    """The curvature of every block (set by the presets; see
    [influx.torch.composition][influx.torch.composition])."""

    solver: Optional[Solver] = None
    """The inverse method of every block."""

    loss: Optional[LossOrTask] = None
    """The training loss `loss(prediction, target)` with mean reduction."""

    def __init__(
        self,
        model: torch.nn.Module,
        block_structure: BlockStructure = BlockMode.FULL,
        regularization: RegularizationType = None,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Parameter 'model' must be a torch.nn.Module, got {type(model).__name__}."
            )
        self.original_model = model
        floating = [p for p in model.parameters() if p.is_floating_point()]
        model_dtype = floating[0].dtype if floating else torch.get_default_dtype()
        self.compute_dtype = resolve_compute_dtype(compute_dtype, model_dtype)
        if self.compute_dtype != model_dtype:
            logger.info(
                "The model's parameters are %s: computing on a %s copy of the model.",
                model_dtype,
                self.compute_dtype,
            )
            model = copy.deepcopy(model).to(self.compute_dtype)
        self.model = model
        self.block_structure = block_structure
        if self.curvature is not None:
            self._blocks = self.curvature.blocks(model, block_structure)
        else:
            self._blocks = block_parameters(model, block_structure)
        if self.solver is not None:
            self.solver.check_block_sizes(self.block_sizes)
        self._set_regularization(regularization)

    def _compose(
        self,
        model: torch.nn.Module,
        loss: Optional[LossOrTask],
        curvature: Curvature,
        solver: Solver,
        block_structure: BlockStructure,
        regularization: RegularizationType,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Set the three parts of every block and initialise (for the presets' constructors)."""
        self.loss = loss
        self.curvature = curvature
        self.solver = solver
        TorchComposableInfluence.__init__(
            self, model, block_structure, regularization, compute_dtype
        )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)  # a copy or an unpickled model: other tensors, counters
        if state.get("_fitted_versions") is not None:
            self._fitted_versions = tensor_versions(self.original_model, self.model)

    def __getattr__(self, name: str) -> Any:
        # The constructor arguments are readable as attributes (model.rtol, model.rank, ...).
        arguments = self.__dict__.get("_arguments")
        if arguments is not None and name in arguments and name not in ("model", "loss"):
            return arguments[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _set_regularization(self, regularization: RegularizationType) -> None:
        by_block = regularization_by_block(regularization, list(self._blocks))
        if self.solver is not None:
            self.solver.check_regularization(regularization, list(self._blocks))
        self.regularization, self._regularization_by_block = regularization, by_block

    @property
    def regularization_by_block(self) -> Dict[str, Optional[float]]:
        """The $\\lambda$ of every block, `"auto"` resolved once fitted (None before)."""
        return regularization_in_use(self)

    @property
    def block_sizes(self) -> Dict[str, int]:
        """The number of parameters of every block, by name."""
        return {
            name: sum(p.numel() for p in params.values()) for name, params in self._blocks.items()
        }

    @property
    def solver_diagnostics(self) -> "OrderedDict[str, Optional[SolverDiagnostics]]":
        """Per block, what its solver reported on its last application (`influences`, ...):
        iterations, residual, convergence, λ. None where the operator solves no system."""
        if not self.is_fitted:
            return OrderedDict((name, None) for name in self.block_names)
        blocks = self.block_mapper.composable_block_dict.items()
        return OrderedDict((name, block_diagnostics(block.op)) for name, block in blocks)

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

    @property
    def is_thread_safe(self) -> bool:
        """True: computations evaluate the model on per-thread structure-only copies of the
        module (see [functional_forward][influx.torch.autodiff.stateless.functional_forward]) and
        never modify the fitted state, so threads can share a fitted model."""
        return True

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        """Build one block (operator and gradient provider) from the training data.

        Only called for models without a `curvature` and a `solver`: a subclass either sets
        both (and the composition builds every block) or overrides this method.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must set 'curvature' and 'solver' or implement _create_block."
        )

    def _create_block_mapper(self, data: DataLoader) -> TorchBlockMapper:
        reg = self._regularization_by_block
        if self.curvature is None or self.solver is None:
            return TorchBlockMapper(
                OrderedDict(
                    (name, self._create_block(name, params, data, reg[name]))  # type: ignore[arg-type]
                    for name, params in self._blocks.items()
                )
            )
        if self.loss is None:
            raise ValueError("Parameter 'loss' is required to fit the curvature.")
        curvatures = self.curvature.fit(self.model, self.loss, data, self._blocks)
        blocks = OrderedDict(
            (
                name,
                TorchOperatorGradientComposition(
                    self.solver.fit_block(curvatures[name], reg[name], name),
                    self._gradient_provider(name, params),
                ),
            )
            for name, params in self._blocks.items()
        )
        self._auto_values = {n: b.op.regularization for n, b in blocks.items() if reg[n] == "auto"}
        return self._new_block_mapper(blocks)

    def _new_block_mapper(
        self, blocks: "OrderedDict[str, TorchOperatorGradientComposition]"
    ) -> TorchBlockMapper:
        """The block mapper of fitted blocks (a model may score some blocks otherwise)."""
        return TorchBlockMapper(blocks)

    def _gradient_provider(
        self, block_name: str, block_params: Dict[str, torch.nn.Parameter]
    ) -> TorchGradientProvider:
        if self.loss is None:
            raise ValueError("Parameter 'loss' is required for per-sample gradients.")
        return TorchGradientProvider(self.model, self.loss, block_params, block_name=block_name)

    def to(self, device: torch.device) -> "TorchComposableInfluence":
        """Move the model and everything fitted to `device`; return self."""
        self.model = self.model.to(device)
        if self.is_fitted:
            self.block_mapper = self.block_mapper.to(device)
        return self

    @property
    def _cast_to(self) -> Optional[torch.dtype]:
        """The dtype inputs are converted to (a low-precision model's compute dtype), or None."""
        return None if self.model is self.original_model else self.compute_dtype

    def _create_batch(self, x: Any, y: Any) -> TorchBatch:
        check_unchanged(self.__dict__.get("_fitted_versions"), self.original_model, self.model)
        return model_batch(x, y, self.model, self.loss, self._cast_to)

    def _prepare_data(self, data: DataLoader) -> DataLoader:
        """The training data as this model computes on it (floating tensors converted to the
        compute dtype for a low-precision model; integer class labels of cross-entropy or the
        negative log-likelihood as int64)."""
        long_labels = not is_task(self.loss) and takes_class_indices(self.loss)
        return cast(DataLoader, model_data(data, self._cast_to, long_labels))

    def _create_test_batch(self, x: Any, y: Any) -> TorchBatch:
        batch = self._create_batch(x, y).as_test()
        check_test_gradients(self.model, self.loss, self._blocks, batch)
        return batch

    def perturbation_shape(self, x: Any) -> Tuple[int, ...]:
        """The shape of one sample of the input that `InfluenceMode.Perturbation`
        differentiates: `x.shape[1:]` for a tensor, or the shape of the entry of a structured
        `x` chosen by the task (see [perturbation_entry][influx.torch.autodiff.model_call.perturbation_entry]).
        Perturbation influences have shape `(N_test, N, *perturbation_shape(x))`."""
        return perturbation_shape(x, self.loss)

    def _concat(self, tensors: Iterable[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(list(tensors), dim=dim)

    def with_regularization(self, regularization: RegularizationType) -> "TorchComposableInfluence":
        """A copy of this model with another regularization, reusing the fitted curvature.

        Nothing that does not depend on $\\lambda$ is recomputed (e.g. the Hessian of the
        direct method, the eigenpairs of the low-rank methods). Self is unchanged.

        Args:
            regularization: a float, or a dict keyed by block name.
        """
        new = copy.copy(self)
        if "_fitted_versions" in self.__dict__:  # the copy shares the model: same tensors
            new._fitted_versions = self._fitted_versions
        new._set_regularization(regularization)
        by_block: Dict[str, Any] = new._regularization_by_block
        if self.is_fitted:
            used, chosen = self.regularization_by_block, getattr(self, "_auto_values", {})
            by_block = resolve_auto(by_block, self._regularization_by_block, used, chosen)
        new._settings = dict(self.settings)
        for key in ("regularization", "hessian_regularization"):
            if key in new._settings:
                new._settings[key] = regularization
            if key in vars(new):
                setattr(new, key, regularization)
        if self.is_fitted:
            new.block_mapper = self._new_block_mapper(
                OrderedDict(
                    (
                        name,
                        TorchOperatorGradientComposition(
                            block.op.with_regularization(by_block[name]),  # type: ignore[arg-type]
                            block.gradient_provider,
                        ),
                    )
                    for name, block in self.block_mapper.composable_block_dict.items()
                )
            )
        return new

    def save(self, path: Union[str, Path]) -> Path:
        """Save the fit (factorisations, eigenpairs, factors, ...) with the settings that
        produced it, the model's parameter shapes and a fingerprint of their values, and the
        library version, as plain tensors and JSON (see
        [influx.torch.composition.persistence][influx.torch.composition.persistence]).

        Raises:
            NotFittedException: if the model is not fitted.
        """
        if not self.is_fitted:
            raise NotFittedException(type(self))
        operators = {
            name: block.op for name, block in self.block_mapper.composable_block_dict.items()
        }
        header, tensors = fit_contents(
            type(self).__qualname__, self.settings, self.model, operators, self.loss
        )
        path = write_fit(path, header, tensors)
        logger.info("Saved the fit of %s to %s", type(self).__name__, path)
        return path

    def load_fit(
        self, path: Union[str, Path], data: Optional[DataLoader] = None
    ) -> "TorchComposableInfluence":
        """Load a fit saved by `save` into this (unfitted or fitted) model and return self.

        The file must have been made by the same class with the same settings and loss (see
        [loss_description][influx.torch.composition.persistence.loss_description]), for a
        model with the same parameter shapes and values, frozen parameters and buffers
        included. Tensors are loaded onto this model's
        device. Methods whose operators apply the curvature through the training data (CG,
        LiSSA, ...) need that data again as `data`. Nothing in the file is executed.

        Raises:
            UnsafeFitFileError: for a file that is not a fit of the current format, or holds
                anything but tensors and plain data.
            ValueError: for a file of another class, other settings, another loss, another
                model shape or other parameter or buffer values, or missing `data`.
        """
        header, tensors = read_fit(path, map_location=self.device)
        name = type(self).__qualname__
        check_fit_header(header, path, name, self.settings, self.model, self.block_names, self.loss)

        def context(name: str) -> StateContext:
            return StateContext(self.model, self.loss, self._blocks[name], data, name)

        operators = restore_operators(header, tensors, context)
        blocks: "OrderedDict[str, TorchOperatorGradientComposition]" = OrderedDict(
            (
                name,
                TorchOperatorGradientComposition(
                    op, self._gradient_provider(name, self._blocks[name])
                ),
            )
            for name, op in operators.items()
        )
        self.block_mapper = self._new_block_mapper(blocks)
        self._fitted = True
        self._fitted_versions = tensor_versions(self.original_model, self.model)
        return self

    def fit(self, data: DataLoader) -> "TorchComposableInfluence":
        """Fit the curvature of every block to the training data and return self.

        The order of the batches does not matter (a shuffling loader gives the same fit).
        Before fitting, the first batch is checked: the model must be in eval mode if it has
        dropout or batch norm, inputs and labels must have dtypes the model and loss take,
        the model and loss must run on it, and the loss of the batch must be the mean of its
        per-sample losses. After fitting, the state of every block is checked for NaN / Inf.

        Args:
            data: an iterable of `(x, y)` batches, typically a `DataLoader`.

        Raises:
            NonFiniteCurvatureError: if a block's curvature is not finite; the message names
                the block and the first batch with non-finite values.
            ValueError: if the model is in training mode with dropout or batch norm, if the
                loss couples the samples of a batch, or if the first batch cannot be
                evaluated (the torch error with the shapes and dtypes involved).
            TypeError: for inputs of another dtype than the model, or float class labels.
        """
        data = self._prepare_data(data)
        params = {n: p.detach() for block in self._blocks.values() for n, p in block.items()}
        check_first_batch(self.model, self.loss, params, data, self.device)
        try:
            mapper = self._create_block_mapper(data)
        except NonFiniteCurvatureError as error:
            raise non_finite_error(
                self.model, self.loss, params, data, getattr(error, "block", None), str(error)
            ) from error
        except torch.linalg.LinAlgError as error:
            raise non_finite_error(
                self.model, self.loss, params, data, None, f"a factorisation failed: {error}"
            ) from error
        for name, block in mapper.composable_block_dict.items():
            bad = non_finite_state(block.op)
            if bad:
                raise non_finite_error(
                    self.model, self.loss, params, data, name, f"NaN or Inf in {', '.join(bad)}"
                )
        self.block_mapper = mapper
        self._fitted = True
        self._fitted_versions = tensor_versions(self.original_model, self.model)
        return self


def _recording_settings(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a constructor so that the outermost call records its arguments as settings."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: TorchComposableInfluence, *args: Any, **kwargs: Any) -> None:
        if "_settings" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            self._arguments = {
                name: value
                for name, value in list(bound.arguments.items())[1:]
                if signature.parameters[name].kind
                not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            }
            self._settings = {
                name: value
                for name, value in self._arguments.items()
                if name not in ("model", "loss", "progress")
            }
        init(self, *args, **kwargs)

    return wrapper
