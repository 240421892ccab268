"""Loading the user's model, weights, loss and data from command-line arguments.

* A model is a factory `PKG.MODULE:FACTORY`, called without arguments, whose result receives
  a state dict read with `torch.load(..., weights_only=True)`.
* Data is a `.pt` file (a tuple or list `(x, y)` of tensors, or a dict with entries `x` and
  `y`, or `inputs` and `labels`), a `.npz` file (arrays `x` and `y`, or `inputs` and
  `labels`), or a factory `PKG.MODULE:FACTORY` returning a map-style torch `Dataset` of
  `(x, y)` items or an `(x, y)` pair of tensors or arrays.
* A loss is `cross_entropy`, `mse` or a factory path `PKG.MODULE:FUNCTION`.

The current directory is put on `sys.path`, so that a module next to the data is importable.
Every problem with an argument is a [UsageError][influx.cli.common.UsageError] naming it.
Functions whose names start with `check_` import neither torch nor the user's code, so that
bad arguments are reported before the slow imports.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

from .common import UsageError, require_file

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import Dataset

    import torch

__all__ = [
    "DATA_SUFFIXES",
    "AUTO_LOSS",
    "LOSSES",
    "check_data_argument",
    "check_object_path",
    "ensure_cwd_importable",
    "file_digest",
    "load_data",
    "load_loss",
    "load_model",
    "resolve_object",
]

DATA_SUFFIXES = (".pt", ".pth", ".npz")
"""The file suffixes read as data."""
LOSSES = ("cross_entropy", "mse")
"""The losses known by name; any other loss is a factory path `PKG.MODULE:FUNCTION`."""
AUTO_LOSS = "auto"
"""`--loss auto`: chosen from the targets and the model's output (`fitting.choose_loss`)."""
_OBJECT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_INPUT_KEYS = ("x", "inputs")
_LABEL_KEYS = ("y", "labels")


def ensure_cwd_importable() -> None:
    """Put the current directory first on `sys.path` (if it is not on it yet)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def check_object_path(value: str, argument: str, kind: str = "FACTORY") -> Tuple[str, str]:
    """Split `PKG.MODULE:NAME` into module and attribute, or raise a UsageError.

    Args:
        value: the argument's value.
        argument: the option named in the error.
        kind: what `NAME` stands for in the message, e.g. `"FACTORY"`.
    """
    if not _OBJECT_PATH.match(value):
        raise UsageError(
            argument, f"expected PKG.MODULE:{kind} (e.g. mymodel:{kind.lower()}), got {value!r}"
        )
    module, name = value.split(":")
    return module, name


def check_data_argument(value: str, argument: str) -> None:
    """Check that a data argument names an existing data file or a factory path."""
    path = Path(value)
    if path.suffix in DATA_SUFFIXES:
        require_file(path, argument)
        return
    if path.exists():
        raise UsageError(
            argument,
            f"cannot read {value!r}: expected a {', '.join(DATA_SUFFIXES)} file or "
            "PKG.MODULE:FACTORY",
        )
    if ":" not in value:
        raise UsageError(argument, f"no such file or directory: '{value}'")
    check_object_path(value, argument)


def resolve_object(value: str, argument: str, kind: str = "FACTORY") -> Any:
    """Import the object at `PKG.MODULE:NAME` (NAME may be dotted), or raise a UsageError."""
    module_name, name = check_object_path(value, argument, kind)
    ensure_cwd_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(argument, f"cannot import module {module_name!r} ({error})") from None
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UsageError(argument, f"module {module_name!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    return obj


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _call_factory(factory: Any, value: str, argument: str) -> Any:
    if not callable(factory):
        raise UsageError(argument, f"{value} is a {type(factory).__name__}, not a callable")
    try:
        return factory()
    except Exception as error:  # noqa: BLE001 - any failure of user code names the argument
        raise UsageError(
            argument, f"calling {value}() failed: {type(error).__name__}: {error}"
        ) from error


def _check_device(device: str) -> "torch.device":
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError("--device", f"unknown device {device!r}, expected cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "cuda is not available on this machine")
    return resolved


def load_model(factory_path: str, weights: Path, device: str = "cpu") -> "torch.nn.Module":
    """The model built by the factory at `factory_path` with the state dict in `weights`,
    on `device` and in evaluation mode.

    Raises:
        UsageError: for a bad factory path, a factory that fails or does not return a
            module, an unreadable weights file, or a state dict that does not match the model
            (missing or unexpected keys, other shapes).
    """
    import torch

    resolved_device = _check_device(device)
    require_file(weights, "--weights")
    model = _call_factory(resolve_object(factory_path, "--model"), factory_path, "--model")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            "--model", f"{factory_path}() must return a torch.nn.Module, got {type(model).__name__}"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(
            "--weights",
            f"cannot read a state dict from '{weights}' with torch.load(weights_only=True) "
            f"({type(error).__name__}: {first_line})",
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise UsageError(
            "--weights", f"'{weights}' holds a {type(state).__name__}, not a state dict"
        )
    _check_state_dict(model, state, weights, factory_path)
    model.load_state_dict(state)
    return model.to(resolved_device).eval()


def _check_state_dict(
    model: "torch.nn.Module", state: Mapping, weights: Path, factory_path: str
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if shapes:
        problems.append(f"other shapes: {_short(shapes)}")
    if problems:
        raise UsageError(
            "--weights",
            f"the state dict in '{weights}' does not match the model of {factory_path}: "
            + "; ".join(problems),
        )


def _short(items: list, limit: int = 4) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def load_loss(value: str) -> Callable[..., "torch.Tensor"]:
    """The loss named `value`: `cross_entropy`, `mse` or a function at `PKG.MODULE:FUNCTION`."""
    import torch

    if value == "cross_entropy":
        return torch.nn.functional.cross_entropy
    if value == "mse":
        return torch.nn.functional.mse_loss
    loss = resolve_object(value, "--loss", "FUNCTION")
    if not callable(loss):
        raise UsageError("--loss", f"{value} is a {type(loss).__name__}, not a callable")
    return loss  # type: ignore[no-any-return]


def _first_key(content: Mapping, keys: Tuple[str, ...]) -> Optional[str]:
    return next((k for k in keys if k in content), None)


def _pair_from_mapping(content: Mapping, value: str, argument: str) -> Tuple[Any, Any]:
    x_key, y_key = _first_key(content, _INPUT_KEYS), _first_key(content, _LABEL_KEYS)
    if x_key is None or y_key is None:
        lacking = "inputs (entry 'x' or 'inputs')" if x_key is None else "labels"
        raise UsageError(
            argument,
            f"'{value}' has no {lacking}: it holds entries {sorted(map(str, content))}, expected "
            "'x' and 'y' (or 'inputs' and 'labels')",
        )
    return content[x_key], content[y_key]


def _pair_from_file(path: Path, argument: str) -> Tuple[Any, Any]:
    import numpy as np

    import torch

    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as content:
                return _pair_from_mapping(dict(content), str(path), argument)
        except (OSError, ValueError) as error:
            raise UsageError(argument, f"cannot read '{path}' as .npz ({error})") from None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(
            argument,
            f"cannot read '{path}' with torch.load(weights_only=True) "
            f"({type(error).__name__}: {first_line})",
        ) from None
    return _pair_from_content(content, str(path), argument)


def _pair_from_content(content: Any, value: str, argument: str) -> Tuple[Any, Any]:
    if isinstance(content, Mapping):
        return _pair_from_mapping(content, value, argument)
    if isinstance(content, (tuple, list)) and len(content) == 2:
        return content[0], content[1]
    if isinstance(content, (tuple, list)):
        raise UsageError(
            argument,
            f"'{value}' holds a {type(content).__name__} of length {len(content)}, expected "
            "inputs and labels (x, y)",
        )
    raise UsageError(
        argument,
        f"'{value}' holds a {type(content).__name__} without labels, expected a pair (x, y) "
        "or a dict with entries 'x' and 'y' (or 'inputs' and 'labels')",
    )


def _as_tensor(value: Any, name: str, argument: str, dtype: "torch.dtype") -> "torch.Tensor":
    import numpy as np

    import torch

    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise UsageError(
            argument, f"its {name} must be a tensor or array, got {type(value).__name__}"
        )
    if value.is_floating_point():
        return value.to(dtype)
    if value.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        return value.long()
    return value


def load_data(value: str, argument: str, dtype: "torch.dtype") -> "Dataset":
    """The data at `value` as a map-style dataset of `(x, y)` items.

    Floating-point tensors are converted to `dtype` (the model's), integer labels to int64.

    Raises:
        UsageError: for a missing or unreadable file, a file or factory result without
            labels, inputs and labels of different lengths, a bad factory path.
    """
    from torch.utils.data import Dataset, TensorDataset

    check_data_argument(value, argument)
    path = Path(value)
    if path.suffix in DATA_SUFFIXES:
        content: Any = _pair_from_file(path, argument)
    else:
        content = _call_factory(resolve_object(value, argument), value, argument)
        if isinstance(content, Dataset):
            return _check_dataset(content, value, argument)
        content = _pair_from_content(content, value, argument)
    x = _as_tensor(content[0], "inputs", argument, dtype)
    y = _as_tensor(content[1], "labels", argument, dtype)
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise UsageError(
            argument,
            f"inputs and labels must have the same number of points, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}",
        )
    if x.shape[0] == 0:
        raise UsageError(argument, f"'{value}' holds no points")
    return TensorDataset(x, y)


def _check_dataset(dataset: "Dataset", value: str, argument: str) -> "Dataset":
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise UsageError(
            argument, f"the dataset of {value}() must have a length (a map-style Dataset)"
        ) from None
    if n == 0:
        raise UsageError(argument, f"the dataset of {value}() is empty")
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UsageError(
            argument,
            f"the items of the dataset of {value}() must be pairs (x, y), item 0 is a "
            f"{type(item).__name__} without labels",
        )
    return dataset
