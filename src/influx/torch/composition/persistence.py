r"""The file format of saved fits: plain tensors and JSON, never code.

`model.save(path)` writes one file holding

* a JSON header: the format version, the library version, the influence model's class name
  and settings (its constructor arguments but the model and the loss), the names and shapes of
  the model's trainable parameters, a fingerprint of their values, a fingerprint of every
  tensor of the model (frozen parameters and buffers such as BatchNorm running statistics
  included), a description of the loss or task (see
  [loss_description][influx.torch.composition.persistence.loss_description]), and per block the
  class names and settings of its operators (from a registry of the library's own classes);
* a flat dict of named tensors: every block's fitted state (factorised curvature, eigenpairs,
  Kronecker factors, preconditioner, ...).

The file is written with `torch.save` and read with `torch.load(weights_only=True)`, which
only accepts tensors and plain containers: a file holding anything else (a pickled callable,
say) is rejected with an [UnsafeFitFileError][influx.errors.UnsafeFitFileError] before any of
it is used. The network, the loss and the training data are not stored: `load_fit` takes them
from the model it is called on (and `data` where an operator needs the training data again).
Files of format `influx-fit/1` (library 0.1, a pickled object graph) are not read.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ...errors import UnsafeFitFileError
from ..data.state import OperatorState, StateContext, restore_operator

__all__ = [
    "FORMAT",
    "check_fit_header",
    "comparable",
    "fingerprint",
    "fit_contents",
    "loss_description",
    "parameter_shapes",
    "read_fit",
    "read_fit_info",
    "restore_operators",
    "state_fingerprint",
    "write_fit",
]

logger = logging.getLogger(__name__)

FORMAT = "influx-fit/2"
"""The format written by `save`; `load_fit` reads only this one."""


def comparable(value: Any) -> Any:
    """A plain, JSON-serialisable and comparable form of a setting."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, Mapping):
        return {str(k): comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if callable(value) and not hasattr(value, "__dict__"):
        return getattr(value, "__qualname__", type(value).__qualname__)
    state = getattr(value, "__dict__", None)
    plain = (
        {k: comparable(v) for k, v in sorted(state.items()) if not k.startswith("_")}
        if isinstance(state, dict)
        else {}
    )
    return {"type": type(value).__qualname__, **plain}


def parameter_shapes(model: torch.nn.Module) -> Dict[str, list]:
    """The shapes of the model's trainable parameters, by name."""
    return {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def fingerprint(model: torch.nn.Module) -> str:
    """A SHA-256 digest of the names and values of the model's trainable parameters."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def state_fingerprint(model: torch.nn.Module) -> str:
    """A SHA-256 digest of the names and values of every tensor of the model: trainable and
    frozen parameters and buffers (BatchNorm running statistics, ...)."""
    digest = hashlib.sha256()
    for kind, tensors in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, tensor in tensors:
            digest.update(f"{kind}:{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            value = tensor.detach().to("cpu")
            value = value.to(torch.float64) if value.is_floating_point() else value.to(torch.int64)
            digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def loss_description(loss: Any) -> Any:
    """A comparable description of a loss or task: what a fit's file records of it.

    * an object with a `loss_id` attribute (a closure, a lambda, any callable): that id. Set
      it to say "the same loss" where nothing else can tell: `my_loss.loss_id = "focal-2"`;
    * a `functools.partial`: the function's qualified name with the bound arguments;
    * a function: its module and qualified name;
    * a loss module or a task: its qualified name and its public settings
      (`label_smoothing`, `reduction`, ...) and buffers (class weights).
    """
    if loss is None:
        return None
    loss_id = getattr(loss, "loss_id", None)
    if loss_id is not None:
        return {"loss_id": comparable(loss_id)}
    if isinstance(loss, functools.partial):
        return {
            "function": loss_description(loss.func),
            "args": comparable(list(loss.args)),
            "keywords": comparable(dict(loss.keywords)),
        }
    if isinstance(loss, torch.nn.Module):
        settings = {
            k: comparable(v)
            for k, v in sorted(vars(loss).items())
            if not k.startswith("_") and k != "training"
        }
        buffers = {
            name: comparable(buffer.detach().to("cpu", torch.float64).flatten().tolist())
            for name, buffer in loss.named_buffers()
        }
        return {"type": _qualified(type(loss)), **settings, **buffers}
    if callable(loss) and hasattr(loss, "__qualname__"):
        return _qualified(loss)
    return comparable(loss)


def _qualified(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    return f"{module}.{obj.__qualname__}" if module else str(obj.__qualname__)


def fit_contents(
    class_name: str,
    settings: Dict[str, Any],
    model: torch.nn.Module,
    operators: Dict[str, Any],
    loss: Optional[Any] = None,
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The header and the tensors of the fit of an influence model.

    Args:
        class_name: the influence model's class name.
        settings: its settings (made `comparable` here).
        model: the network, for its parameter shapes and fingerprints.
        operators: block name -> the block's fitted operator, in block order.
        loss: the loss or task of the fit (see `loss_description`).
    """
    from ... import __version__

    tensors: Dict[str, torch.Tensor] = {}
    blocks = []
    for index, (name, op) in enumerate(operators.items()):
        flat, spec = op.export_state().flatten(f"{index}/")
        tensors.update(flat)
        blocks.append({"name": name, "operator": spec, "n_parameters": op.input_size})
    header = {
        "influx_version": __version__,
        "class": class_name,
        "settings": comparable(settings),
        "parameter_shapes": parameter_shapes(model),
        "fingerprint": fingerprint(model),
        "state_fingerprint": state_fingerprint(model),
        "loss": loss_description(loss),
        "blocks": blocks,
    }
    return header, tensors


def check_fit_header(
    header: Dict[str, Any],
    path: Union[str, Path],
    class_name: str,
    settings: Dict[str, Any],
    model: torch.nn.Module,
    block_names: List[str],
    loss: Optional[Any] = None,
) -> None:
    """Check that a fit was made by `class_name` with `settings`, for `model` with the same
    parameter shapes and values (frozen parameters and buffers included) and the same blocks,
    with the same loss; log a warning if another version of the library saved it.

    Files written before the fingerprint of every tensor and the loss were recorded pass
    those two checks with a logged note.

    Raises:
        ValueError: naming what differs.
    """
    from ... import __version__

    if header["class"] != class_name:
        raise ValueError(f"The fit in {path} was made by {header['class']}, not by {class_name}.")
    settings = comparable(settings)
    if header["settings"] != settings:
        differing = sorted(
            k
            for k in set(settings) | set(header["settings"])
            if settings.get(k) != header["settings"].get(k)
        )
        details = ", ".join(
            f"{k}: saved {header['settings'].get(k)!r}, given {settings.get(k)!r}"
            for k in differing
        )
        raise ValueError(f"The fit in {path} was made with other settings ({details}).")
    shapes = parameter_shapes(model)
    if header["parameter_shapes"] != shapes:
        raise ValueError(
            f"The fit in {path} was made for a model with parameters "
            f"{header['parameter_shapes']}, this model has {shapes}."
        )
    if header["fingerprint"] != fingerprint(model):
        raise ValueError(
            f"The fit in {path} was made for other parameter values of this model (it was "
            "retrained or modified since): fit again."
        )
    if "state_fingerprint" not in header:
        logger.info(
            "The fit in %s predates the fingerprint of frozen parameters and buffers and the "
            "record of the loss: only its trainable parameters were checked.",
            path,
        )
    else:
        if header["state_fingerprint"] != state_fingerprint(model):
            raise ValueError(
                f"The fit in {path} was made for other values of this model's frozen "
                "parameters or buffers (a frozen backbone, BatchNorm running statistics, ...); "
                "the influences depend on them: fit again."
            )
        given = loss_description(loss)
        if header.get("loss") != given:
            raise ValueError(
                f"The fit in {path} was made with another loss: saved {header.get('loss')!r}, "
                f"given {given!r}. Fit again with this loss; for a closure or lambda, set the "
                "same `loss_id` attribute on both to declare them the same loss."
            )
    if header["influx_version"] != __version__:
        logger.warning(
            "The fit in %s was saved by influx %s; this is influx %s.",
            path,
            header["influx_version"],
            __version__,
        )
    names = [block["name"] for block in header["blocks"]]
    if names != block_names:
        raise ValueError(f"The fit in {path} has blocks {names}, this model has {block_names}.")


def restore_operators(
    header: Dict[str, Any],
    tensors: Dict[str, torch.Tensor],
    context: Callable[[str], StateContext],
) -> Dict[str, Any]:
    """Block name -> the operator rebuilt from the fit, in block order; `context(name)` gives
    what the block's operator needs that the file does not hold."""
    return {
        block["name"]: restore_operator(
            OperatorState.unflatten(block["operator"], tensors, f"{index}/"),
            context(block["name"]),
        )
        for index, block in enumerate(header["blocks"])
    }


def write_fit(
    path: Union[str, Path], header: Dict[str, Any], tensors: Dict[str, torch.Tensor]
) -> Path:
    """Write a fit file: `header` (JSON-serialisable) and `tensors` (plain tensors)."""
    path = Path(path)
    content = {
        "header": json.dumps({"format": FORMAT, **header}),
        "tensors": {k: v.detach() for k, v in tensors.items()},
    }
    torch.save(content, path)
    return path


def read_fit(
    path: Union[str, Path], map_location: Union[str, torch.device] = "cpu"
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The header and the tensors of a fit file, loaded without executing anything.

    Raises:
        ValueError: if there is no file at `path`.
        UnsafeFitFileError: if the file is not a fit of this format, or holds anything but
            tensors and plain data.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Parameter 'path': no file at {path}.")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - every unreadable file gets the same message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UnsafeFitFileError(
            f"Parameter 'path': {path} is not a fit saved by influx {FORMAT} (it holds "
            f"something other than tensors and plain data, and is not loaded: {first_line})."
        ) from None
    header_text = content.get("header") if isinstance(content, dict) else None
    tensors = content.get("tensors") if isinstance(content, dict) else None
    try:
        header = json.loads(header_text) if isinstance(header_text, str) else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or not isinstance(tensors, dict):
        raise UnsafeFitFileError(f"Parameter 'path': {path} is not a fit saved by influx.")
    if header.get("format") != FORMAT:
        raise UnsafeFitFileError(
            f"Parameter 'path': {path} has format {header.get('format')!r}, expected {FORMAT!r} "
            "(fits saved by influx 0.1 cannot be read: fit again and save)."
        )
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UnsafeFitFileError(f"Parameter 'path': {path} holds entries that are not tensors.")
    return header, tensors


def read_fit_info(path: Union[str, Path]) -> Dict[str, Any]:
    """What a fit file holds, without the network or the fitted operators.

    Returns:
        A dict with the keys `"class"` (the influence model's class name), `"settings"` (its
        constructor arguments but the model and the loss), `"blocks"` (block name to number of
        parameters), `"operators"` (block name to the class of its operator),
        `"n_parameters"`, `"fingerprint"` (of the parameter values), `"version"` (of influx
        that saved it) and `"format"`.

    Raises:
        ValueError: if there is no file at `path`.
        UnsafeFitFileError: if it is not a fit saved by influx (a `ValueError` too).
    """
    header, _ = read_fit(path)
    return {
        "class": header["class"],
        "settings": header["settings"],
        "blocks": {block["name"]: block["n_parameters"] for block in header["blocks"]},
        "operators": {block["name"]: block["operator"]["class"] for block in header["blocks"]},
        "n_parameters": sum(block["n_parameters"] for block in header["blocks"]),
        "fingerprint": header["fingerprint"],
        "version": header["influx_version"],
        "format": header["format"],
    }
