r"""Per-sample gradients of the training loss, by parameter block.

A [TorchGradientProvider][influx.torch.gradients.TorchGradientProvider] computes, for the
parameters of one block, per-sample gradients, mixed derivatives (for perturbation
influence) and products of the per-sample Jacobian with given vectors, all vectorised with
`torch.func`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..types import GradientProvider
from .autodiff import (
    LossFunction,
    create_matrix_jacobian_product_function,
    create_per_sample_gradient_function,
    create_per_sample_mixed_derivative_function,
    flatten_dimensions,
    get_model_parameters,
)
from .data import TorchBatch
from .validation import check_finite

__all__ = ["TorchGradientProvider"]


class TorchGradientProvider(GradientProvider[TorchBatch, torch.Tensor]):
    r"""Per-sample gradients of $\ell_i(\theta) = \text{loss}(f_\theta(x_i), y_i)$ via `torch.func`.

    For parameters $\theta = (\theta_1, \dots, \theta_k)$ (all trainable parameters, or those
    in `restrict_to`) it computes

    * `grads`: $\{\theta_j: \nabla_{\theta_j} \ell_i\}$, shapes `(N, *theta_j.shape)`;
    * `flat_grads`: the same flattened and concatenated, shape `(N, P)`;
    * `mixed_grads`: $\{\theta_j: \nabla_x \nabla_{\theta_j} \ell_i\}$, shapes `(N, F, d_j)`
      with $F$ the number of input features and $d_j$ the size of $\theta_j$;
    * `flat_mixed_grads`: shape `(N, F, P)`;
    * `jacobian_prod`: $(\nabla_\theta \ell_i \cdot g_k)_{ik}$ without forming the gradients.

    Gradients containing NaN or Inf raise a `ValueError` naming the parameters.

    Args:
        model: the model $f_\theta$.
        loss: the loss function `loss(prediction, target)` with mean reduction.
        restrict_to: the parameters to differentiate with respect to, by name; None means all
            trainable parameters of the model.
        block_name: a name used in error messages.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
        block_name: Optional[str] = None,
    ):
        self.model = model
        self.loss = loss
        if restrict_to is None:
            self.params = get_model_parameters(model)
        else:
            self.params = {k: p.detach() for k, p in restrict_to.items()}
        self.block_name = block_name
        self._grad_fn = create_per_sample_gradient_function(model, loss, self.params)
        self._mixed_fn = create_per_sample_mixed_derivative_function(model, loss, self.params)
        self._jac_prod_fn = create_matrix_jacobian_product_function(model, loss, self.params)

    @property
    def device(self) -> torch.device:
        """The device of the block's parameters."""
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the block's parameters."""
        return next(iter(self.params.values())).dtype

    @property
    def input_size(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def grads(self, batch: TorchBatch) -> Dict[str, torch.Tensor]:
        result: Dict[str, torch.Tensor] = self._grad_fn(self.params, batch.x, batch.y)
        check_finite(result, "per-sample gradients", self.block_name)
        return result

    def mixed_grads(self, batch: TorchBatch) -> Dict[str, torch.Tensor]:
        raw: Dict[str, torch.Tensor] = self._mixed_fn(self.params, batch.x, batch.y)
        n = batch.x.shape[0]
        n_features = batch.x[0].numel()
        result = {name: g.reshape(n, n_features, -1) for name, g in raw.items()}
        check_finite(result, "per-sample mixed derivatives", self.block_name)
        return result

    def flat_grads(self, batch: TorchBatch) -> torch.Tensor:
        return flatten_dimensions(self.grads(batch).values(), shape=(len(batch), -1))

    def flat_mixed_grads(self, batch: TorchBatch) -> torch.Tensor:
        return torch.cat(list(self.mixed_grads(batch).values()), dim=-1)

    def jacobian_prod(self, batch: TorchBatch, g: torch.Tensor) -> torch.Tensor:
        if g.ndim != 2 or g.shape[1] != self.input_size:
            raise ValueError(
                f"Parameter 'g' must have shape (K, {self.input_size}), got {tuple(g.shape)}."
            )
        result: torch.Tensor = self._jac_prod_fn(self.params, batch.x, batch.y, g)
        check_finite({"jacobian_prod": result}, "Jacobian products", self.block_name)
        return result

    def to(self, device: torch.device) -> "TorchGradientProvider":
        """Move the model and the block's parameters to `device`; return self."""
        self.model = self.model.to(device)
        names = set(self.params)
        self.params = {n: p.detach() for n, p in self.model.named_parameters() if n in names}
        self._grad_fn = create_per_sample_gradient_function(self.model, self.loss, self.params)
        self._mixed_fn = create_per_sample_mixed_derivative_function(
            self.model, self.loss, self.params
        )
        self._jac_prod_fn = create_matrix_jacobian_product_function(
            self.model, self.loss, self.params
        )
        return self
