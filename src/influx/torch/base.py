"""The composition of influence models, at pyDVL's `influence.torch.base` path.

A re-export module. The names live in their role packages:
[influx.torch.composition.composable][influx.torch.composition.composable] (the composable
model, its block mapper and blocks), [influx.torch.gradients][influx.torch.gradients] (gradient
provider, bilinear forms), [influx.torch.curvature.tensor_operator][influx.torch.curvature.tensor_operator]
(the operator base), [influx.torch.data.batches][influx.torch.data.batches] (`TorchBatch`) and
[influx.torch.inverse.low_rank][influx.torch.inverse.low_rank] (`LowRankBilinearForm`). Nothing
in the library imports this path.
"""

from .composition.block_mapper import (
    TorchBlockMapper,
    TorchOperatorGradientComposition,
    TorchOperatorType,
)
from .composition.composable import TorchComposableInfluence
from .curvature.tensor_operator import (
    TensorDictOperator,
    TensorOperator,
)
from .data.batches import (
    TorchBatch,
)
from .gradients.bilinear import (
    DictBilinearForm,
    OperatorBilinearForm,
    OperatorBilinearFormType,
)
from .gradients.provider import (
    TorchGradientProvider,
)
from .inverse.low_rank import (
    LowRankBilinearForm,
)

__all__ = [
    "DictBilinearForm",
    "LowRankBilinearForm",
    "OperatorBilinearForm",
    "OperatorBilinearFormType",
    "TensorDictOperator",
    "TensorOperator",
    "TorchBatch",
    "TorchBlockMapper",
    "TorchComposableInfluence",
    "TorchGradientProvider",
    "TorchOperatorGradientComposition",
    "TorchOperatorType",
]
