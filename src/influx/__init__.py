"""influx: influence functions for PyTorch models.

The framework-agnostic protocols live in [influx.types][influx.types]; the torch
implementation, influence models and operators in `influx.torch`.
"""

from .inversion import InversionMethod, InversionRegistry, solve_hvp
from .twice_differentiable import InverseHvpResult
from .types import (
    InfluenceMode,
    NotFittedException,
    SolverDiagnostics,
    UnsupportedInfluenceModeException,
)

__version__ = "0.1.0"

__all__ = [
    "InfluenceMode",
    "InverseHvpResult",
    "InversionMethod",
    "InversionRegistry",
    "NotFittedException",
    "SolverDiagnostics",
    "UnsupportedInfluenceModeException",
    "__version__",
    "solve_hvp",
]
