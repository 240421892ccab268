r"""Tensor-structure helpers of the reference API, re-exported by
[influx.torch.util][influx.torch.util].

* moving and reshaping: [to_model_device][influx.torch.legacy.structures.to_model_device],
  [reshape_vector_to_tensors][influx.torch.legacy.structures.reshape_vector_to_tensors],
  [align_structure][influx.torch.legacy.structures.align_structure],
  [align_with_model][influx.torch.legacy.structures.align_with_model];
* parameter blocks: [ModelParameterDictBuilder][influx.torch.legacy.structures.ModelParameterDictBuilder],
  [ModelInfoMixin][influx.torch.legacy.structures.ModelInfoMixin];
* numerics: [safe_torch_linalg_eigh][influx.torch.legacy.structures.safe_torch_linalg_eigh],
  [empirical_cross_entropy_loss_fn][influx.torch.legacy.structures.empirical_cross_entropy_loss_fn],
  [EkfacRepresentation][influx.torch.legacy.structures.EkfacRepresentation];
* devices: [move_to_device][influx.torch.legacy.structures.move_to_device], the one implementation
  behind the `to(device)` methods of operators, batch operations and preconditioners.
"""

from __future__ import annotations

import logging
import math
from abc import ABC
from collections import OrderedDict
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Collection,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Tuple,
    TypeVar,
    Union,
)

from torch.utils.data import DataLoader

import torch

from ...base_influence_function_model import InfluenceFunctionModel
from ..autodiff.derivatives import get_model_parameters
from ..curvature.tensor_operator import move_to_device
from ..data.blocks import FULL_BLOCK_NAME, BlockMode, block_parameters

__all__ = [
    "EkfacRepresentation",
    "LossType",
    "ModelInfoMixin",
    "ModelParameterDictBuilder",
    "TorchInfluenceFunctionModel",
    "TorchLinalgEighException",
    "TorchTensorContainerType",
    "align_structure",
    "align_with_model",
    "empirical_cross_entropy_loss_fn",
    "move_to_device",
    "reshape_vector_to_tensors",
    "safe_torch_linalg_eigh",
    "to_model_device",
]

logger = logging.getLogger(__name__)

LossType = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A loss function `loss(prediction, target)`."""

TorchTensorContainerType = Union[torch.Tensor, Collection[torch.Tensor], Mapping[str, torch.Tensor]]
"""A tensor, a sequence of tensors or a dict of tensors by name."""

DeviceType = Union[torch.device, str]
T = TypeVar("T")


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def to_model_device(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """`x` on the device of the model's parameters."""
    return x.to(model_device(model))


def reshape_vector_to_tensors(
    input_vector: torch.Tensor, target_shapes: Iterable[Tuple[int, ...]]
) -> Tuple[torch.Tensor, ...]:
    """Split a vector into consecutive pieces of the given shapes (views where possible).

    Raises:
        ValueError: if `input_vector` is not 1-D or its length differs from the total size
            of the shapes.
    """
    shapes = [tuple(shape) for shape in target_shapes]
    if input_vector.ndim != 1:
        raise ValueError(
            f"Parameter 'input_vector' must be a 1-D tensor, got shape {tuple(input_vector.shape)}."
        )
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != input_vector.shape[0]:
        raise ValueError(
            f"Parameter 'input_vector' has {input_vector.shape[0]} elements, but the shapes "
            f"{shapes} need {sum(sizes)}."
        )
    return tuple(
        piece.reshape(shape) for piece, shape in zip(torch.split(input_vector, sizes), shapes)
    )


def align_structure(
    source: Mapping[str, torch.Tensor], target: TorchTensorContainerType
) -> Dict[str, torch.Tensor]:
    """`target` as a dict with the keys of `source` and tensors of the same shapes.

    Args:
        source: the reference dict of tensors.
        target: a dict with the same keys and shapes, a tuple or list of tensors of the same
            shapes in order, or a flat tensor with as many elements as `source` in total.

    Raises:
        ValueError: if `target` has other keys, shapes or size, or is of another type.
    """
    shapes = [tuple(v.shape) for v in source.values()]
    if isinstance(target, Mapping):
        if list(target) != list(source):
            raise ValueError(
                f"Parameter 'target' must have the keys {list(source)}, got {list(target)}."
            )
        given = [tuple(v.shape) for v in target.values()]
        if given != shapes:
            raise ValueError(f"Parameter 'target' must have the shapes {shapes}, got {given}.")
        return dict(target)
    if isinstance(target, (tuple, list)):
        given = [tuple(v.shape) for v in target]
        if given != shapes:
            raise ValueError(f"Parameter 'target' must have the shapes {shapes}, got {given}.")
        return dict(zip(source, target))
    if isinstance(target, torch.Tensor):
        try:
            pieces = reshape_vector_to_tensors(target, shapes)
        except ValueError as error:
            raise ValueError(
                f"Parameter 'target' cannot be split into the shapes {shapes}: {error}"
            ) from error
        return dict(zip(source, pieces))
    raise ValueError(
        "Parameter 'target' must be a tensor, a tuple or list of tensors or a dict of tensors, "
        f"got {type(target).__name__}."
    )


def align_with_model(
    x: TorchTensorContainerType, model: torch.nn.Module
) -> Dict[str, torch.Tensor]:
    """`x` as a dict keyed by the model's trainable parameters, with their shapes; see
    [align_structure][influx.torch.legacy.structures.align_structure]."""
    return align_structure(get_model_parameters(model, detach=False), x)


@dataclass(frozen=True)
class EkfacRepresentation:
    """The eigendecomposed Kronecker factors of the layers of an EK-FAC approximation.

    For each layer, $G \\otimes A$ with $A = Q_A \\Lambda_A Q_A^\\top$ (input factor) and
    $G = Q_G \\Lambda_G Q_G^\\top$ (output-gradient factor), and the corrected eigenvalues
    `diags` in the basis $Q_G \\otimes Q_A$.

    Iterating yields `(layer_name, (module, evecs_a, evecs_g, diag))`.
    """

    layer_names: Iterable[str]
    layers_module: Iterable[torch.nn.Module]
    evecs_a: Iterable[torch.Tensor]
    evecs_g: Iterable[torch.Tensor]
    diags: Iterable[torch.Tensor]

    def __iter__(
        self,
    ) -> Iterator[Tuple[str, Tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]]]:
        return iter(
            zip(
                self.layer_names,
                zip(self.layers_module, self.evecs_a, self.evecs_g, self.diags),
            )
        )

    def get_layer_evecs(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The input and output eigenvectors by layer name."""
        items = list(self)
        return (
            {name: evecs_a for name, (_, evecs_a, _, _) in items},
            {name: evecs_g for name, (_, _, evecs_g, _) in items},
        )

    def to(self, device: DeviceType) -> "EkfacRepresentation":
        """A copy with every tensor (and layer) on `device`."""
        return EkfacRepresentation(
            list(self.layer_names),
            [module.to(device) for module in self.layers_module],
            [t.to(device) for t in self.evecs_a],
            [t.to(device) for t in self.evecs_g],
            [t.to(device) for t in self.diags],
        )


def empirical_cross_entropy_loss_fn(
    model_output: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    r"""A label-free surrogate of the cross-entropy whose gradient outer products average to
    the true Fisher information of a softmax classifier.

    With $p = \operatorname{softmax}(z)$ for the logits $z$ `(N, C)`,

    $$ \sum_{i, c} \operatorname{sg}\!\left(\sqrt{p_{ic}}\right) \log p_{ic} , $$

    where $\operatorname{sg}$ stops gradients, and entries with a non-finite logarithm count
    as zero. Further arguments (targets, reductions) are accepted and ignored, so that it can
    replace `torch.nn.functional.cross_entropy`.
    """
    del args, kwargs
    probabilities = torch.softmax(model_output, dim=1)
    log_probabilities = torch.log(probabilities)
    log_probabilities = torch.where(
        torch.isfinite(log_probabilities), log_probabilities, torch.zeros_like(log_probabilities)
    )
    return (log_probabilities * probabilities.detach().sqrt()).sum()


class TorchLinalgEighException(Exception):
    """`torch.linalg.eigh` failed (it does for some large matrices on some platforms, see
    pytorch issue 92141); the original error is in the message and in `original_exception`."""

    def __init__(self, original_exception: RuntimeError):
        self.original_exception = original_exception
        super().__init__(
            "torch.linalg.eigh failed; this is a known problem of some platforms with large "
            "matrices (pytorch issue 92141): use a method that does not eigendecompose the "
            f"full matrix. Original error: {original_exception}"
        )


def safe_torch_linalg_eigh(*args: Any, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh(*args, **kwargs)`, raising
    [TorchLinalgEighException][influx.torch.legacy.structures.TorchLinalgEighException] instead of a bare
    `RuntimeError`."""
    try:
        evals, evecs = torch.linalg.eigh(*args, **kwargs)
    except RuntimeError as error:
        raise TorchLinalgEighException(error) from error
    return evals, evecs


@dataclass
class ModelParameterDictBuilder:
    """Groups the trainable parameters of a model into named blocks.

    Args:
        model: the model.
        detach: return detached tensors.
    """

    model: torch.nn.Module
    detach: bool = True

    def _value(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        return parameter.detach() if self.detach else parameter

    def build(
        self, block_structure: "OrderedDict[str, List[str]]"
    ) -> Dict[str, Dict[str, torch.Tensor]]:
        """One dict of parameters per block of `block_structure` (block name to parameter
        names). Frozen parameters are left out with a logged warning.

        Raises:
            ValueError: for a name that is not a parameter of the model.
        """
        named = dict(self.model.named_parameters())
        result: Dict[str, Dict[str, torch.Tensor]] = OrderedDict()
        for block_name, names in block_structure.items():
            block: Dict[str, torch.Tensor] = OrderedDict()
            for name in names:
                if name not in named:
                    raise ValueError(
                        f"Parameter 'block_structure': block {block_name!r} names {name!r}, "
                        f"which is not a parameter of the model; parameters are {list(named)}."
                    )
                if not named[name].requires_grad:
                    logger.warning(
                        "Parameter %r of block %r does not require gradients: left out.",
                        name,
                        block_name,
                    )
                    continue
                block[name] = self._value(named[name])
            result[block_name] = block
        return result

    def build_from_block_mode(self, block_mode: BlockMode) -> Dict[str, Dict[str, torch.Tensor]]:
        """One dict of parameters per block of a [BlockMode][influx.torch.data.blocks.BlockMode].

        The single block of `BlockMode.FULL` is named `""` here, as in the reference API (the
        influence models name it `"model"`); layer-wise blocks are named after the module
        owning the parameters and parameter-wise blocks after the parameter.

        Raises:
            ValueError: for a value that is not a BlockMode.
        """
        if not isinstance(block_mode, BlockMode):
            raise ValueError(f"Parameter 'block_mode' must be a BlockMode, got {block_mode!r}.")
        blocks = block_parameters(self.model, block_mode)
        return OrderedDict(
            (
                "" if name == FULL_BLOCK_NAME and block_mode is BlockMode.FULL else name,
                OrderedDict((k, self._value(p)) for k, p in params.items()),
            )
            for name, params in blocks.items()
        )


class ModelInfoMixin:
    """Device, dtype and number of trainable parameters of `self.model`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


class TorchInfluenceFunctionModel(InfluenceFunctionModel[torch.Tensor, DataLoader], ABC):
    """A base for torch influence models that are not assembled from blocks of parameters: it
    holds the model and the loss and reports the model's device, dtype and parameters.

    The influence models of this library derive from
    [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence] instead; this base
    is for user-defined models written against the reference API.

    Args:
        model: the model.
        loss: the loss function `loss(prediction, target)`.
    """

    def __init__(self, model: torch.nn.Module, loss: LossType):
        self.model = model
        self.loss = loss

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def model_device(self) -> torch.device:
        return model_device(self.model)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def model_params(self) -> Dict[str, torch.Tensor]:
        """The trainable parameters by name, detached."""
        return get_model_parameters(self.model)

    @property
    def is_thread_safe(self) -> bool:
        return False

    def to(self, device: DeviceType) -> "TorchInfluenceFunctionModel":
        """Move the model (and every other tensor attribute) to `device`; return self."""
        return move_to_device(self, device)
