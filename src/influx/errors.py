"""The exceptions of influx.

Every exception the library raises on purpose derives from
[InfluxError][influx.errors.InfluxError], so that `except InfluxError` catches them all; each
also keeps the built-in base it always had (most are `ValueError`s), so existing handlers keep
working. Nothing here imports a numerical framework.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "InfluxError",
    "NotImplementedLayerRepresentationException",
    "NonConvergenceError",
    "NonFiniteCurvatureError",
    "NotFittedException",
    "UnorderedDataError",
    "UnsupportedInfluenceModeException",
    "UnsafeFitFileError",
]


class InfluxError(Exception):
    """The base of every exception raised by influx on purpose."""


class NotFittedException(InfluxError, ValueError):
    """Raised when an influence model is used before [fit][influx.base_influence_function_model.InfluenceFunctionModel.fit]."""

    def __init__(self, object_type: type):
        super().__init__(
            f"{object_type.__name__} is not fitted: call 'fit' with the training data first."
        )


class UnsupportedInfluenceModeException(InfluxError, ValueError):
    """Raised for an influence mode that a method cannot compute."""

    def __init__(self, mode: Any):
        valid = "InfluenceMode.Up, InfluenceMode.Perturbation"
        super().__init__(
            f"Parameter 'mode': unsupported influence mode {mode!r}, expected one of {valid}."
        )


class UnsafeFitFileError(InfluxError, ValueError):
    """Raised when a file given to `load_fit` is not a fit saved by influx, or holds anything
    but plain tensors and JSON (for example a pickled callable): such a file is never
    executed."""


class NotImplementedLayerRepresentationException(InfluxError, ValueError):
    """Raised for a trainable layer that has no Kronecker-factored representation.

    Only `torch.nn.Linear`, `torch.nn.Conv2d` (with `groups=1`) and transformers' `Conv1D` are
    supported. Freeze the layer's parameters (`requires_grad_(False)`) or restrict the model to
    supported layers (the `layers` argument of [EkfacInfluence][influx.torch.models.ekfac.EkfacInfluence])
    to leave it out.
    """

    def __init__(self, module_id: str, reason: Optional[str] = None):
        self.module_id = module_id
        detail = reason or (
            "only torch.nn.Linear, torch.nn.Conv2d and transformers' Conv1D have a "
            "Kronecker-factored representation"
        )
        super().__init__(
            f"Layer {module_id}: {detail}. Freeze its parameters (requires_grad_(False)) or "
            "restrict the model to supported layers with 'layers'."
        )


class NonConvergenceError(InfluxError, RuntimeError):
    """Raised by an iterative solver created with `on_nonconvergence="raise"` when a
    right-hand side did not reach the tolerance.

    Attributes:
        diagnostics: the [SolverDiagnostics][influx.types.SolverDiagnostics] of the solve
            (iterations, achieved residual, per right-hand side figures).
    """

    def __init__(self, message: str, diagnostics: Any = None):
        super().__init__(message)
        self.diagnostics = diagnostics


class NonFiniteCurvatureError(InfluxError, ValueError):
    """Raised when the fitted curvature (or its factorisation) of a block holds NaN or Inf:
    influences computed from it would be meaningless."""


class UnorderedDataError(InfluxError, ValueError):
    """Raised when a call that returns training indices gets a data loader whose order is
    not fixed (a shuffling or otherwise random sampler): the indices would point at the
    wrong samples."""
