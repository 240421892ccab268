r"""Pure tensor functions, at pyDVL's `influence.torch.functional` path.

The functions live in [influx.torch.autodiff][influx.torch.autodiff] (per-sample gradients,
mixed derivatives, Hessian-vector products, dense curvatures of a batch),
[influx.torch.stateless][influx.torch.stateless] (evaluating a module without touching it),
[influx.torch.sketch][influx.torch.sketch] (low-rank representations and Nyström sketches),
[influx.torch.data_functional][influx.torch.data_functional] (the same over a data loader) and
[influx.torch.low_rank][influx.torch.low_rank]; this module gathers them. Nothing in the
library imports it.
"""

from .autodiff import (
    HESSIAN_CHUNK_BUDGET,
    LossFunction,
    create_batch_hvp_function,
    create_batch_loss_function,
    create_matrix_jacobian_product_function,
    create_per_sample_gradient_function,
    create_per_sample_loss_function,
    create_per_sample_mixed_derivative_function,
    flatten_dimensions,
    get_model_parameters,
    hvp,
    operator_to_dense,
    unflatten,
)
from .data_functional import (
    create_empirical_loss_function,
    create_hvp_function,
    gauss_newton,
    hessian,
    operator_nystroem_approximation,
    operator_spectral_approximation,
)
from .low_rank import model_hessian_nystroem_approximation
from .sketch import (
    LowRankProductRepresentation,
    ShiftFunction,
    nystroem_sketch,
    randomized_nystroem_approximation,
)
from .stateless import ForwardModeSerialised, functional_forward

__all__ = [
    "HESSIAN_CHUNK_BUDGET",
    "ForwardModeSerialised",
    "LossFunction",
    "LowRankProductRepresentation",
    "ShiftFunction",
    "create_batch_hvp_function",
    "create_batch_loss_function",
    "create_empirical_loss_function",
    "create_hvp_function",
    "create_matrix_jacobian_product_function",
    "create_per_sample_gradient_function",
    "create_per_sample_loss_function",
    "create_per_sample_mixed_derivative_function",
    "flatten_dimensions",
    "functional_forward",
    "gauss_newton",
    "get_model_parameters",
    "hessian",
    "hvp",
    "model_hessian_nystroem_approximation",
    "nystroem_sketch",
    "operator_nystroem_approximation",
    "operator_spectral_approximation",
    "operator_to_dense",
    "randomized_nystroem_approximation",
    "unflatten",
]
