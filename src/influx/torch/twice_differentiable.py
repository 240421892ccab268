"""The torch side of the functional facade, at the reference's `twice_differentiable` path.

A re-export module. The names live in
[influx.torch.legacy.inversion_methods][influx.torch.legacy.inversion_methods] and
[influx.twice_differentiable][influx.twice_differentiable]. Nothing in the library imports this
path.
"""

from ..twice_differentiable import InverseHvpResult
from .legacy.inversion_methods import (
    TorchTensorUtilities,
    TorchTwiceDifferentiable,
    solve_arnoldi,
    solve_cg,
    solve_direct,
    solve_ekfac,
    solve_inverse_harmonic_mean,
    solve_lissa,
    solve_nystroem,
)

__all__ = [
    "InverseHvpResult",
    "TorchTensorUtilities",
    "TorchTwiceDifferentiable",
    "solve_arnoldi",
    "solve_cg",
    "solve_direct",
    "solve_ekfac",
    "solve_inverse_harmonic_mean",
    "solve_lissa",
    "solve_nystroem",
]
