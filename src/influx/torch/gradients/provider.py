r"""Per-sample gradients of the training loss, by parameter block.

A [TorchGradientProvider][influx.torch.gradients.provider.TorchGradientProvider] computes, for the
parameters of one block, per-sample gradients, mixed derivatives (for perturbation
influence) and products of the per-sample Jacobian with given vectors, all vectorised with
`torch.func`.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ...types import GradientProvider
from ..autodiff.derivatives import (
    LossOrTask,
    create_matrix_jacobian_product_function,
    create_per_sample_gradient_function,
    create_per_sample_mixed_derivative_function,
    flatten_dimensions,
    get_model_parameters,
)
from ..autodiff.model_call import is_vmap_limitation, perturbation_entry, vmap_unsupported_modules
from ..data.batches import TorchBatch
from ..data.structures import leaves
from ..data.validation import check_finite

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

    Gradients containing NaN or Inf raise a `ValueError` naming the parameters. Inputs and
    targets may be tensors or structures of tensors (see [influx.torch.data.batches][influx.torch.data.batches]);
    for a test batch (`batch.test`) the gradients are those of the task's measurement. For
    structured inputs, $x$ in the mixed derivatives is the tensor chosen by
    [perturbation_entry][influx.torch.autodiff.model_call.perturbation_entry].

    Args:
        model: the model $f_\theta$.
        loss: the loss function `loss(prediction, target)` with mean reduction, or a
            [Task][influx.torch.data.task.Task].
        restrict_to: the parameters to differentiate with respect to, by name; None means all
            trainable parameters of the model.
        block_name: a name used in error messages.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
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
        self._build()

    def _build(self) -> None:
        model, loss, params = self.model, self.loss, self.params
        self._unmappable = vmap_unsupported_modules(model)
        self._grad_fn = create_per_sample_gradient_function(model, loss, params)
        self._test_grad_fn = create_per_sample_gradient_function(model, loss, params, True)
        self._mixed_fn = create_per_sample_mixed_derivative_function(model, loss, params)
        self._jac_prod_fn = create_matrix_jacobian_product_function(model, loss, params)
        self._test_jac_prod_fn = create_matrix_jacobian_product_function(model, loss, params, True)

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
        function = self._test_grad_fn if batch.test else self._grad_fn
        result: Dict[str, torch.Tensor] = function(self.params, batch.x, batch.y)
        check_finite(result, "per-sample gradients", self.block_name)
        return result

    def perturbation_shape(self, batch: TorchBatch) -> Tuple[int, ...]:
        """The shape of one sample of the input that Perturbation mode differentiates: of `x`,
        or of the tensor of a structured `x` chosen by
        [perturbation_entry][influx.torch.autodiff.model_call.perturbation_entry].

        Raises:
            ValueError: if that input is not floating-point.
        """
        index, _ = perturbation_entry(batch.x, self.loss)
        return tuple(leaves(batch.x)[index].shape[1:])

    def mixed_grads(self, batch: TorchBatch) -> Dict[str, torch.Tensor]:
        shape = self.perturbation_shape(batch)
        raw: Dict[str, torch.Tensor] = self._mixed_fn(self.params, batch.x, batch.y)
        n = len(batch)
        n_features = math.prod(shape)
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
        function = self._test_jac_prod_fn if batch.test else self._jac_prod_fn
        dtype = self.params[next(iter(self.params))].dtype
        if self._unmappable:
            result: torch.Tensor = self.flat_grads(batch) @ g.T.to(dtype)
        else:
            try:
                result = function(self.params, batch.x, batch.y, g)
            except RuntimeError as error:
                if not is_vmap_limitation(error):
                    raise
                # A model vmap cannot map: form the per-sample gradients (without vmap).
                result = self.flat_grads(batch) @ g.T.to(dtype)
        check_finite({"jacobian_prod": result}, "Jacobian products", self.block_name)
        return result

    def to(self, device: torch.device) -> "TorchGradientProvider":
        """Move the model and the block's parameters to `device`; return self."""
        self.model = self.model.to(device)
        names = set(self.params)
        self.params = {n: p.detach() for n, p in self.model.named_parameters() if n in names}
        self._build()
        return self
