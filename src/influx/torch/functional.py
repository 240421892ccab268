r"""Pure tensor functions, at pyDVL's `influence.torch.functional` path.

A re-export module. The functions live in
[influx.torch.autodiff.derivatives][influx.torch.autodiff.derivatives] (per-sample gradients,
mixed derivatives, Hessian-vector products, dense curvatures of a batch),
[influx.torch.autodiff.stateless][influx.torch.autodiff.stateless] (evaluating a module without
touching it), [influx.torch.inverse.sketch][influx.torch.inverse.sketch] (low-rank
representations and Nyström sketches),
[influx.torch.legacy.data_functional][influx.torch.legacy.data_functional] (the same over a data
loader) and [influx.torch.inverse.low_rank][influx.torch.inverse.low_rank]. Nothing in the
library imports this path.
"""

from .autodiff.derivatives import (
    LossFunction,
    create_batch_loss_function,
    create_matrix_jacobian_product_function,
    create_per_sample_gradient_function,
    create_per_sample_loss_function,
    create_per_sample_mixed_derivative_function,
    flatten_dimensions,
    get_model_parameters,
    operator_to_dense,
    unflatten,
)
from .autodiff.hessian_products import (
    HESSIAN_CHUNK_BUDGET,
    HVP_REVERSE_MAX_ROWS,
    HVP_REVERSE_VECTORISED_MAX_PARAMETERS,
    create_batch_hessian_function,
    create_batch_hvp_function,
    create_batch_hvp_reverse_function,
    hvp,
)
from .autodiff.stateless import ForwardModeSerialised, functional_forward
from .inverse.low_rank_approximation import model_hessian_nystroem_approximation
from .inverse.sketch import (
    LowRankProductRepresentation,
    ShiftFunction,
    nystroem_sketch,
    randomized_nystroem_approximation,
)
from .legacy.data_functional import (
    create_empirical_loss_function,
    create_hvp_function,
    gauss_newton,
    hessian,
    operator_nystroem_approximation,
    operator_spectral_approximation,
)

__all__ = [
    "HESSIAN_CHUNK_BUDGET",
    "HVP_REVERSE_MAX_ROWS",
    "HVP_REVERSE_VECTORISED_MAX_PARAMETERS",
    "create_batch_hessian_function",
    "create_batch_hvp_reverse_function",
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
