r"""Saving and loading fitted influence models.

A fit (the factorised curvature of the direct method, the eigenpairs of the low-rank methods,
the Kronecker factors of EK-FAC, ...) is often the expensive part. `model.save(path)` writes
it with

* the influence model's class and settings (its constructor arguments but the model and
  the loss),
* the names and shapes of the model's trainable parameters and a fingerprint of their
  values,
* the library version,

and `model.load_fit(path)` on a model constructed with the same settings installs it,
after checking all of the above, onto that model's device. The network itself, the loss and
the training data are not stored: they are replaced by references that are resolved to the
loading model's network, loss and (where an operator needs it) `data`.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import io
import logging
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch.utils.data import DataLoader

from .base import TorchComposableInfluence

__all__ = ["load_fit", "read_fit_info", "save_fit", "FORMAT"]

logger = logging.getLogger(__name__)

FORMAT = "influx-fit/1"

_SAVE_REFERENCES: contextvars.ContextVar[Dict[int, str]] = contextvars.ContextVar(
    "influx_save_references"
)
_LOAD_REFERENCES: contextvars.ContextVar[Dict[str, Any]] = contextvars.ContextVar(
    "influx_load_references"
)


def _resolve_reference(name: str) -> Any:
    references = _LOAD_REFERENCES.get({})
    if name not in references or references[name] is None:
        if name == "data":
            raise ValueError(
                "Parameter 'data' is required: this model's operators apply the curvature "
                "through the training data, pass the training data loader to load_fit."
            )
        raise ValueError(f"Cannot resolve the reference to the {name} while loading the fit.")
    return references[name]


def _pickler_base() -> type:
    try:
        import cloudpickle

        return cloudpickle.Pickler  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - cloudpickle comes with dask
        return pickle.Pickler


def _make_pickle_module() -> types.SimpleNamespace:
    base = _pickler_base()

    class ReferencePickler(base):  # type: ignore[valid-type, misc]
        def reducer_override(self, obj: Any) -> Any:
            name = _SAVE_REFERENCES.get({}).get(id(obj))
            if name is not None:
                return _resolve_reference, (name,)
            if isinstance(obj, DataLoader):
                return _resolve_reference, ("data",)
            parent = getattr(super(), "reducer_override", None)
            return parent(obj) if parent is not None else NotImplemented

    return types.SimpleNamespace(
        Pickler=ReferencePickler,
        Unpickler=pickle.Unpickler,
        load=pickle.load,
        loads=pickle.loads,
        dump=pickle.dump,
        dumps=pickle.dumps,
        __name__="influx_pickle",
    )


def _comparable(value: Any) -> Any:
    """A plain, comparable form of a setting."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, Mapping):
        return {str(k): _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    state = getattr(value, "__dict__", None)
    plain = (
        {k: _comparable(v) for k, v in sorted(state.items()) if not k.startswith("_")}
        if isinstance(state, dict)
        else {}
    )
    return {"type": type(value).__qualname__, **plain}


def _parameter_shapes(model: torch.nn.Module) -> Dict[str, list]:
    return {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_fit(influence_model: TorchComposableInfluence, path: Union[str, Path]) -> Path:
    """Save the fit of `influence_model` to `path` (see the module's description).

    Raises:
        NotFittedException: if the model is not fitted.
    """
    from .. import __version__
    from ..types import NotFittedException

    if not influence_model.is_fitted:
        raise NotFittedException(type(influence_model))
    path = Path(path)
    references = {id(influence_model.model): "model"}
    loss = getattr(influence_model, "loss", None)
    if loss is not None:
        references[id(loss)] = "loss"
    token = _SAVE_REFERENCES.set(references)
    try:
        blocks = io.BytesIO()
        torch.save(influence_model.block_mapper, blocks, pickle_module=_make_pickle_module())
    finally:
        _SAVE_REFERENCES.reset(token)
    header = {
        "format": FORMAT,
        "influx_version": __version__,
        "class": type(influence_model).__qualname__,
        "settings": _comparable(influence_model.settings),
        "parameter_shapes": _parameter_shapes(influence_model.model),
        "fingerprint": _fingerprint(influence_model.model),
        "blocks": {
            name: sum(p.numel() for p in params.values())
            for name, params in influence_model._blocks.items()
        },
    }
    torch.save({"header": header, "blocks": blocks.getvalue()}, path)
    logger.info("Saved the fit of %s to %s", type(influence_model).__name__, path)
    return path


def load_fit(
    influence_model: TorchComposableInfluence,
    path: Union[str, Path],
    data: Optional[DataLoader] = None,
) -> TorchComposableInfluence:
    """Install the fit saved at `path` into `influence_model` and return it.

    Raises:
        ValueError: if the file is not a saved fit, or was made by another class, with other
            settings, for another model shape or other parameter values; or if `data` is
            needed and missing.
    """
    from .. import __version__

    path = Path(path)
    if not path.exists():
        raise ValueError(f"Parameter 'path': no file at {path}.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        header = content["header"]
        if header.get("format") != FORMAT:
            raise KeyError("format")
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(
            f"Parameter 'path': {path} is not a fit saved by influx ({error})."
        ) from None
    expected_class = type(influence_model).__qualname__
    if header["class"] != expected_class:
        raise ValueError(
            f"The fit in {path} was made by {header['class']}, not by {expected_class}."
        )
    settings = _comparable(influence_model.settings)
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
    shapes = _parameter_shapes(influence_model.model)
    if header["parameter_shapes"] != shapes:
        raise ValueError(
            f"The fit in {path} was made for a model with parameters "
            f"{header['parameter_shapes']}, this model has {shapes}."
        )
    if header["fingerprint"] != _fingerprint(influence_model.model):
        raise ValueError(
            f"The fit in {path} was made for other parameter values of this model (it was "
            "retrained or modified since): fit again."
        )
    if header["influx_version"] != __version__:
        logger.warning(
            "The fit in %s was saved by influx %s; this is influx %s.",
            path,
            header["influx_version"],
            __version__,
        )
    references = {
        "model": influence_model.model,
        "loss": getattr(influence_model, "loss", None),
        "data": data,
    }
    token = _LOAD_REFERENCES.set(references)
    try:
        block_mapper = torch.load(
            io.BytesIO(content["blocks"]),
            map_location=influence_model.device,
            weights_only=False,
        )
    finally:
        _LOAD_REFERENCES.reset(token)
    influence_model.block_mapper = block_mapper
    influence_model._fitted = True
    return influence_model


def read_fit_info(path: Union[str, Path]) -> Dict[str, Any]:
    """What the fit saved at `path` holds, read without the network or the fitted operators.

    Returns:
        A dict with the keys `"class"` (the influence model's class name), `"settings"` (its
        constructor arguments but the model and the loss), `"blocks"` (block name to number of
        parameters, None if the file does not record it), `"n_parameters"`, `"fingerprint"`
        (of the parameter values), `"version"` (of influx that saved it) and `"format"`.

    Raises:
        ValueError: if there is no file at `path` or it is not a fit saved by influx.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Parameter 'path': no file at {path}.")
    try:
        header = torch.load(path, map_location="cpu", weights_only=True)["header"]
        if header.get("format") != FORMAT:
            raise KeyError("format")
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(
            f"Parameter 'path': {path} is not a fit saved by influx ({error})."
        ) from None
    n_parameters = 0
    for shape in header["parameter_shapes"].values():
        size = 1
        for dim in shape:
            size *= int(dim)
        n_parameters += size
    return {
        "class": header["class"],
        "settings": header["settings"],
        "blocks": header.get("blocks"),
        "n_parameters": n_parameters,
        "fingerprint": header["fingerprint"],
        "version": header["influx_version"],
        "format": header["format"],
    }
