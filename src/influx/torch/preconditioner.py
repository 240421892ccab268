"""The preconditioners of conjugate gradient, at pyDVL's `influence.torch.preconditioner` path.

A re-export module. The names live in
[influx.torch.inverse.preconditioner][influx.torch.inverse.preconditioner]. Nothing in the
library imports this path.
"""

from .inverse.preconditioner import (
    EkfacPreconditioner,
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
