"""Iterative solvers for $(A + \\lambda I)x = b$, gathered in one place.

Conjugate gradient lives in [influx.torch.cg][influx.torch.cg], LiSSA in
[influx.torch.lissa][influx.torch.lissa], their common result type in
[influx.torch.solution][influx.torch.solution]; this module re-exports them.
"""

from .cg import CgOperator, block_conjugate_gradient, conjugate_gradient
from .lissa import LissaDivergenceError, LissaOperator, estimate_largest_eigenvalue, lissa
from .solution import IterativeSolution

__all__ = [
    "IterativeSolution",
    "LissaDivergenceError",
    "conjugate_gradient",
    "block_conjugate_gradient",
    "lissa",
    "estimate_largest_eigenvalue",
    "CgOperator",
    "LissaOperator",
]
