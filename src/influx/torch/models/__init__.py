"""The influence models: presets of the block composition with the names of pyDVL's models.

Each is a [TorchComposableInfluence][influx.torch.composition.composable.TorchComposableInfluence] whose
`curvature` and `solver` are fixed by its constructor arguments;
[ComposedInfluence][influx.torch.models.composed.ComposedInfluence] takes any valid pair, and
[EnsembleInfluence][influx.torch.models.ensemble.EnsembleInfluence] is the weighted mean of
fitted models.
"""

from .cg import CgInfluence
from .composed import ComposedInfluence
from .direct import DirectInfluence
from .ekfac import EkfacInfluence
from .ensemble import EnsembleInfluence
from .inverse_harmonic_mean import InverseHarmonicMeanInfluence
from .lissa import LissaInfluence
from .low_rank import ArnoldiInfluence, NystroemSketchInfluence
from .projected import ProjectedInfluence

__all__ = [
    "ArnoldiInfluence",
    "CgInfluence",
    "ComposedInfluence",
    "DirectInfluence",
    "EkfacInfluence",
    "EnsembleInfluence",
    "InverseHarmonicMeanInfluence",
    "LissaInfluence",
    "NystroemSketchInfluence",
    "ProjectedInfluence",
]
