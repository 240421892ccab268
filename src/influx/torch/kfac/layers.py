r"""The layers that have a Kronecker-factored representation: `nn.Linear`, `nn.Conv2d` and
transformers' `Conv1D` (GPT-2's linear layers: $s = a W + b$, a `Linear` whose weight is
stored transposed, `(d, m)`), recognised without importing transformers.

A [LayerSpec][influx.torch.kfac.layers.LayerSpec] says how a layer's parameters map to the
matrix $\tilde W = [W \mid b]$ and how its inputs and output gradients are laid out;
[find_layers][influx.torch.kfac.layers.find_layers] and
[layers_for_parameters][influx.torch.kfac.layers.layers_for_parameters] find them in a model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ...errors import NotImplementedLayerRepresentationException

__all__ = [
    "ROOT_LAYER_NAME",
    "SUPPORTED_LAYERS",
    "LayerSpec",
    "NotImplementedLayerRepresentationException",
    "find_layers",
    "is_conv1d",
    "is_supported_layer",
    "layers_for_parameters",
    "split_layers",
]


SUPPORTED_LAYERS: Tuple[type, ...] = (torch.nn.Linear, torch.nn.Conv2d)
"""The torch layers with a Kronecker-factored representation; transformers' `Conv1D` too (see
[is_supported_layer][influx.torch.kfac.layers.is_supported_layer])."""


def is_conv1d(module: torch.nn.Module) -> bool:
    """Whether `module` is (a subclass of) `transformers.pytorch_utils.Conv1D`, checked without
    importing transformers (a module of that class exists only if transformers is loaded)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return isinstance(conv1d, type) and isinstance(module, conv1d)


def is_supported_layer(module: torch.nn.Module) -> bool:
    """Whether `module` has a Kronecker-factored representation: a `Linear`, a non-grouped
    `Conv2d` or a transformers `Conv1D`."""
    if isinstance(module, torch.nn.Conv2d):
        return module.groups == 1
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


@dataclass(frozen=True)
class LayerSpec:
    r"""A supported layer and how its parameters map to the matrix $\tilde W = [W \mid b]$.

    Attributes:
        name: the module name in `model.named_modules()` (the block name).
        module: the layer.
        weight_name: the full parameter name of the weight if it is trainable, else None.
        bias_name: the full parameter name of the bias if it exists and is trainable, else None.
    """

    name: str
    module: torch.nn.Module
    weight_name: Optional[str]
    bias_name: Optional[str]

    @property
    def device(self) -> torch.device:
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return weight.device

    @property
    def weight_transposed(self) -> bool:
        """Whether the weight is stored as $W^\\top$ `(d, m)` (transformers' `Conv1D`)."""
        return is_conv1d(self.module)

    @property
    def out_dim(self) -> int:
        """$m$: output features (Linear, Conv1D) or output channels (Conv2d)."""
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return int(weight.shape[1] if self.weight_transposed else weight.shape[0])

    @property
    def in_dim(self) -> int:
        """$d$: the number of columns of the weight as a matrix (`in_channels * kh * kw` for
        a convolution)."""
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return int(weight.shape[0] if self.weight_transposed else weight[0].numel())

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return tuple(weight.shape)

    @property
    def input_factor_dim(self) -> int:
        r"""The size of $\tilde a$: $d$ if the weight is trainable, plus one for a bias."""
        return (self.in_dim if self.weight_name else 0) + (1 if self.bias_name else 0)

    @property
    def parameter_names(self) -> List[str]:
        """The trainable parameters of the layer, in `named_parameters()` order."""
        return [n for n in (self.weight_name, self.bias_name) if n is not None]

    def expanded_inputs(self, inputs: torch.Tensor, padded: bool = False) -> torch.Tensor:
        r"""$\tilde a$ of every position, shape `(N, T, input_factor_dim)`.

        Args:
            inputs: the layer's input.
            padded: for a convolution, whether `inputs` is already padded (what
                `torch.nn.functional.conv2d` receives from a layer whose `padding_mode` is not
                `"zeros"`), rather than the layer's own input.
        """
        n = inputs.shape[0]
        parts: List[torch.Tensor] = []
        if self.weight_name is not None:
            if isinstance(self.module, torch.nn.Conv2d):
                patches = _unfold_conv2d_input(self.module, inputs, padded)
            else:
                patches = inputs.reshape(n, -1, self.in_dim)
            parts.append(patches)
            positions = patches.shape[1]
        else:
            positions = self._positions_of_input(inputs)
        if self.bias_name is not None:
            parts.append(inputs.new_ones(n, positions, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _positions_of_input(self, inputs: torch.Tensor) -> int:
        if isinstance(self.module, torch.nn.Conv2d):
            return int(_unfold_conv2d_input(self.module, inputs[:1]).shape[1])
        return int(inputs[0].numel() // self.in_dim)

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """Weights (or their gradients) `(*lead, *weight_shape)` as matrices
        `(*lead, out_dim, in_dim)`, transposing a `Conv1D` weight."""
        lead = weight.shape[: weight.ndim - len(self.weight_shape)]
        if self.weight_transposed:
            return weight.reshape(*lead, self.in_dim, self.out_dim).transpose(-1, -2)
        return weight.reshape(*lead, self.out_dim, self.in_dim)

    def weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Matrices `(*lead, out_dim, in_dim)` as weights `(*lead, *weight_shape)`, the
        inverse of `weight_matrix`."""
        lead = matrix.shape[:-2]
        if self.weight_transposed:
            matrix = matrix.transpose(-1, -2)
        return matrix.reshape(*lead, *self.weight_shape)

    def matrix_from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        r"""Rows `(N, P)` of the layer's flat parameters (weight flattened, then bias) as
        matrices $[W \mid b]$ `(N, out_dim, input_factor_dim)`."""
        n, m = flat.shape[0], self.out_dim
        if self.weight_name is None:
            return flat.reshape(n, m, -1)
        weight = self.weight_matrix(flat[:, : m * self.in_dim].reshape(n, *self.weight_shape))
        if self.bias_name is None:
            return weight
        return torch.cat([weight, flat[:, m * self.in_dim :].reshape(n, m, 1)], dim=2)

    def flat_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        r"""Matrices $[W \mid b]$ `(N, out_dim, input_factor_dim)` as flat rows `(N, P)`, the
        inverse of `matrix_from_flat`."""
        n = matrix.shape[0]
        if self.weight_name is None:
            return matrix.reshape(n, -1)
        weight = self.weight_from_matrix(matrix[:, :, : self.in_dim]).reshape(n, -1)
        if self.bias_name is None:
            return weight
        return torch.cat([weight, matrix[:, :, -1]], dim=1)

    def output_gradients(self, grad_output: torch.Tensor) -> torch.Tensor:
        r"""$\delta$ of every position, shape `(N, T, out_dim)`."""
        n = grad_output.shape[0]
        if isinstance(self.module, torch.nn.Conv2d):
            return grad_output.reshape(n, self.out_dim, -1).transpose(1, 2)
        return grad_output.reshape(n, -1, self.out_dim)


def _unfold_conv2d_input(
    module: torch.nn.Conv2d, inputs: torch.Tensor, padded: bool = False
) -> torch.Tensor:
    """The input patches of a convolution, `(N, L, in_channels * kh * kw)`; `padded`: the
    inputs already carry the padding of a non-`"zeros"` padding mode."""
    padding = module.padding
    if padded and module.padding_mode != "zeros":
        padding = (0, 0)
    elif module.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        inputs = torch.nn.functional.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    patches = torch.nn.functional.unfold(
        inputs,
        kernel_size=module.kernel_size,
        dilation=module.dilation,
        padding=padding,  # type: ignore[arg-type]
        stride=module.stride,
    )
    return patches.transpose(1, 2)


def _layer_spec(name: str, module: torch.nn.Module, block_name: str) -> Optional[LayerSpec]:
    """The spec of a layer with trainable direct parameters, None if it has none."""
    trainable = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not trainable:
        return None
    label = f"{block_name!r} ({type(module).__name__})"
    if not isinstance(module, SUPPORTED_LAYERS) and not is_conv1d(module):
        raise NotImplementedLayerRepresentationException(label)
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        raise NotImplementedLayerRepresentationException(
            label, f"grouped convolutions (groups={module.groups}) are not supported"
        )
    prefix = f"{name}." if name else ""
    names = {n for n, _ in trainable}
    return LayerSpec(
        name=block_name,
        module=module,
        weight_name=prefix + "weight" if "weight" in names else None,
        bias_name=prefix + "bias" if "bias" in names else None,
    )


ROOT_LAYER_NAME = "model"
"""The block name of a model that is itself a single layer (its module name is empty)."""


def find_layers(
    model: torch.nn.Module, layers: Optional[Sequence[str]] = None
) -> "Dict[str, LayerSpec]":
    """The layers with trainable parameters, by module name, in `named_modules()` order.

    Frozen parameters are ignored; a layer whose parameters are all frozen is left out.

    Args:
        model: the model.
        layers: the module names to use; None means every module with trainable parameters.

    Raises:
        NotImplementedLayerRepresentationException: for a selected layer with trainable
            parameters that is not a Linear or a (non-grouped) Conv2d.
        ValueError: for unknown names, selected layers without trainable parameters, or no
            layer at all.
    """
    modules = dict(model.named_modules())
    if layers is not None:
        if isinstance(layers, str):
            raise TypeError(
                f"Parameter 'layers' must be a sequence of module names, got the string {layers!r}."
            )
        unknown = [name for name in layers if name not in modules and name != ROOT_LAYER_NAME]
        if unknown:
            valid = [n or ROOT_LAYER_NAME for n, m in modules.items() if _has_trainable(m)]
            raise ValueError(
                f"Parameter 'layers' names unknown modules {unknown}; modules with trainable "
                f"parameters are {valid}."
            )
    result: Dict[str, LayerSpec] = {}
    for name, module in modules.items():
        block_name = name or ROOT_LAYER_NAME
        if layers is not None and block_name not in layers and name not in layers:
            continue
        spec = _layer_spec(name, module, block_name)
        if spec is None:
            if layers is not None:
                raise ValueError(
                    f"Parameter 'layers': module {block_name!r} has no trainable parameters of "
                    "its own."
                )
            continue
        result[block_name] = spec
    if not result:
        raise ValueError(
            "Parameter 'model' has no trainable Linear or Conv2d layer (requires_grad=True)."
        )
    check_untied(model, result)
    return result


def _has_trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def layers_for_parameters(
    model: torch.nn.Module, parameter_names: Iterable[str]
) -> "Dict[str, LayerSpec]":
    """The supported layers holding some of the named parameters, in `named_modules()` order.

    A `Linear`, (non-grouped) `Conv2d` or transformers `Conv1D` layer is included if its weight or its bias is among
    `parameter_names`; its spec covers exactly those of the two that are. Parameters of other
    modules are left out without error (the caller treats them otherwise).

    Args:
        model: the model.
        parameter_names: full parameter names, as in `model.named_parameters()`.

    Returns:
        the layer specs by block name (module name, or `"model"` for the model itself).
    """
    wanted = set(parameter_names)
    result: Dict[str, LayerSpec] = {}
    for name, module in model.named_modules():
        if not is_supported_layer(module):
            continue
        prefix = f"{name}." if name else ""
        weight = prefix + "weight" if prefix + "weight" in wanted else None
        bias = prefix + "bias" if module.bias is not None and prefix + "bias" in wanted else None
        if weight is None and bias is None:
            continue
        block_name = name or ROOT_LAYER_NAME
        result[block_name] = LayerSpec(block_name, module, weight, bias)
    check_untied(model, result)
    return result


def split_layers(model: torch.nn.Module) -> "Tuple[List[str], Dict[str, str]]":
    """The modules with trainable parameters of their own, split into those with a
    Kronecker-factored representation (their block names, in `named_modules()` order) and the
    others (block name -> why not: the module's type, or the reason a supported type is not,
    such as a grouped convolution): batch and layer norms, embeddings, recurrent layers."""
    supported: List[str] = []
    others: Dict[str, str] = {}
    for name, module in model.named_modules():
        block_name = name or ROOT_LAYER_NAME
        try:
            if _layer_spec(name, module, block_name) is not None:
                supported.append(block_name)
        except NotImplementedLayerRepresentationException:
            groups = getattr(module, "groups", 1)
            others[block_name] = type(module).__name__ + (
                f" with groups={groups}" if groups != 1 else ""
            )
    return supported, others


def check_untied(model: torch.nn.Module, layers: "Dict[str, LayerSpec]") -> None:
    r"""Raise a ValueError if a parameter of one of `layers` is shared with another module.

    A tied weight (`b.weight = a.weight`, as tied embeddings and output heads) has the
    gradient $\sum_m \delta_m \tilde a_m^\top$ summed over the modules that use it; the
    recorder sees each layer on its own, so K-FAC, EK-FAC and the Kronecker projection would
    treat such a weight as the parameter of one layer only.
    """
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(name or ROOT_LAYER_NAME)
    for spec in layers.values():
        for attribute in ("weight", "bias"):
            parameter = getattr(spec.module, attribute, None)
            tied = sorted(set(owners.get(id(parameter), []))) if parameter is not None else []
            if len(tied) > 1:
                raise ValueError(
                    f"Parameter 'model' ties the {attribute} of modules {tied} (one tensor "
                    "shared by several modules): layer-wise Kronecker methods (K-FAC, EK-FAC, "
                    "projection='kronecker') record each layer on its own and would take the "
                    "gradient of one module for that of the shared tensor. Use an exact method "
                    "(DirectInfluence, CgInfluence, ...) or projection='gaussian', or untie "
                    "the weights."
                )
