"""The calculators under pyDVL's module path (`pydvl.influence.influence_calculator`).

Everything here is defined in [influx.calculator][influx.calculator].
"""

from .calculator import (
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    InvalidDimensionChunksError,
    SequentialInfluenceCalculator,
    ThreadSafetyViolationError,
    UnalignedChunksError,
)

__all__ = [
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "InvalidDimensionChunksError",
    "SequentialInfluenceCalculator",
    "ThreadSafetyViolationError",
    "UnalignedChunksError",
]
