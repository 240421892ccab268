"""Blocks of parameters: how a model's trainable parameters are grouped.

Every influence model inverts one curvature per block; the curvature is block-diagonal
across blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import Enum
from typing import Dict, List, Mapping, Union

import torch

__all__ = ["BlockMode", "BlockStructure", "FULL_BLOCK_NAME", "block_parameters"]


class BlockMode(Enum):
    """How the parameters of a model are grouped into blocks.

    * `FULL`: one block named `"model"` with all trainable parameters.
    * `LAYER_WISE`: one block per module owning parameters, named after the module
      (e.g. `"0"`, `"fc1"`); parameters of the top-level module itself (a bare
      `nn.Linear`, say) form the block `"model"`. The curvature is block-diagonal across
      layers.
    * `PARAMETER_WISE`: one block per trainable parameter, named after it.

    A custom structure is an `OrderedDict[str, List[str]]` mapping block names to parameter
    names.
    """

    FULL = "full"
    LAYER_WISE = "layer_wise"
    PARAMETER_WISE = "parameter_wise"


BlockStructure = Union[BlockMode, "OrderedDict[str, List[str]]"]

FULL_BLOCK_NAME = "model"


def block_parameters(
    model: torch.nn.Module, block_structure: BlockStructure
) -> "OrderedDict[str, Dict[str, torch.nn.Parameter]]":
    """Group the model's trainable parameters into named blocks.

    Raises:
        ValueError: for an unknown parameter name, an empty block, or a model without
            trainable parameters.
        TypeError: for a block structure that is neither a BlockMode nor a mapping.
    """
    params = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if not params:
        raise ValueError("Parameter 'model' has no trainable parameters (requires_grad=True).")
    blocks: "OrderedDict[str, Dict[str, torch.nn.Parameter]]" = OrderedDict()
    if block_structure is BlockMode.FULL:
        blocks[FULL_BLOCK_NAME] = dict(params)
    elif block_structure is BlockMode.PARAMETER_WISE:
        for name, p in params.items():
            blocks[name] = {name: p}
    elif block_structure is BlockMode.LAYER_WISE:
        for name, p in params.items():
            layer = name.rsplit(".", 1)[0] if "." in name else FULL_BLOCK_NAME
            blocks.setdefault(layer, {})[name] = p
    elif isinstance(block_structure, Mapping):
        for block_name, names in block_structure.items():
            if isinstance(names, str) or not names:
                raise ValueError(
                    f"Parameter 'block_structure': block {block_name!r} must be a non-empty "
                    f"list of parameter names, got {names!r}."
                )
            unknown = [n for n in names if n not in params]
            if unknown:
                raise ValueError(
                    f"Parameter 'block_structure': block {block_name!r} names unknown or "
                    f"frozen parameters {unknown}; trainable parameters are {list(params)}."
                )
            blocks[block_name] = {n: params[n] for n in names}
    else:
        raise TypeError(
            "Parameter 'block_structure' must be a BlockMode or an OrderedDict[str, List[str]], "
            f"got {type(block_structure).__name__}."
        )
    return blocks
