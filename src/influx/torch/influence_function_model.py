r"""The influence models, at pyDVL's `influence.torch.influence_function_model` path.

A re-export module. The models live in [influx.torch.models][influx.torch.models], one module
per family; every model is a
[TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence] whose
curvature and inverse method are set by its constructor (see
[influx.torch.composition][influx.torch.composition]). Nothing in
the library imports this path.

**Sign and scale.** Entry $(i, j)$ of `influences` is

$$
I(z'_i, z_j) = \nabla_\theta \ell(z'_i)^\top (C + \lambda I)^{-1} \nabla_\theta \ell(z_j),
$$

without a minus sign and without a factor $1/n$: a positive value means that training point
$z_j$ helps (up-weighting it lowers the loss of) test point $z'_i$. `Perturbation` mode
differentiates the same quantity with respect to the features of $z_j$.
"""

from .legacy.structures import TorchInfluenceFunctionModel
from .models import (
    ArnoldiInfluence,
    CgInfluence,
    ComposedInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)

__all__ = [
    "ArnoldiInfluence",
    "CgInfluence",
    "ComposedInfluence",
    "DirectInfluence",
    "EkfacInfluence",
    "InverseHarmonicMeanInfluence",
    "LissaInfluence",
    "NystroemSketchInfluence",
    "TorchInfluenceFunctionModel",
]
