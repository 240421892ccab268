"""influx: influence functions for PyTorch models.

The framework-agnostic protocols live in [influx.types][influx.types]; the torch
implementation, influence models and operators in `influx.torch`; the calculators that map a
fitted model over large data (sequentially or on Dask) in [influx.calculator][influx.calculator],
imported on first use.
"""

from typing import Any

from .inversion import InversionMethod, InversionRegistry, solve_hvp
from .twice_differentiable import InverseHvpResult
from .types import (
    InfluenceMode,
    NotFittedException,
    SolverDiagnostics,
    UnsupportedInfluenceModeException,
)

__version__ = "0.1.0"

_LAZY = {
    "DaskInfluenceCalculator": "calculator",
    "DisableClientSingleThreadCheck": "calculator",
    "InvalidDimensionChunksError": "calculator",
    "SequentialInfluenceCalculator": "calculator",
    "ThreadSafetyViolationError": "calculator",
    "UnalignedChunksError": "calculator",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "InfluenceMode",
    "InverseHvpResult",
    "InversionMethod",
    "InversionRegistry",
    "InvalidDimensionChunksError",
    "NotFittedException",
    "SequentialInfluenceCalculator",
    "SolverDiagnostics",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
    "UnsupportedInfluenceModeException",
    "__version__",
    "solve_hvp",
]
