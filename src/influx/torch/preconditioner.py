"""The preconditioners of conjugate gradient, at pyDVL's `influence.torch.preconditioner` path.

A re-export module. The names live in
[influx.torch.inverse.preconditioner][influx.torch.inverse.preconditioner]. Nothing in the
library imports this path.
"""

from .inverse.ekfac_preconditioner import EkfacPreconditioner
from .inverse.preconditioner import (
    JacobiPreconditioner,
    NystroemPreconditioner,
    Preconditioner,
    check_preconditioner,
)

__all__ = [
    "EkfacPreconditioner",
    "JacobiPreconditioner",
    "NystroemPreconditioner",
    "Preconditioner",
    "check_preconditioner",
]
