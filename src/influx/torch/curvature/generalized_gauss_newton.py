r"""The generalized Gauss-Newton matrix of one batch, applied through JVP and VJP.

For a model $f_\theta$ with outputs $z_b = f_\theta(x_b)$ on a batch $b$ and the batch loss
$L_b(z) = \text{loss}(z, y_b)$ (the loss function's own mean reduction), the generalized
Gauss-Newton (GGN) matrix of the batch is

$$
G_b = J_b^\top \, \nabla^2_z L_b(z_b) \, J_b , \qquad J_b = \frac{\partial z_b}{\partial \theta},
$$

with $J_b$ the Jacobian of all the batch's outputs with respect to the (restricted)
parameters. It is the Hessian of the loss with the model linearised at $\theta$: the Hessian
$\nabla^2_\theta L_b$ minus the terms with the second derivatives of the model. For a loss
that is convex in the outputs (cross-entropy, MSE) $\nabla^2_z L_b \succeq 0$ and so
$G_b \succeq 0$, even away from a minimum; for a model linear in $\theta$ it equals the
Hessian. Averaged over a data loader with the weights $|b|$ (see
[AveragingBatchOperator][influx.torch.curvature.operators.AveragingBatchOperator]) it is the GGN of the
mean training loss, whatever the batch size.

A product $G_b v$ is computed in three steps, never forming $J_b$: a Jacobian-vector product
$u = J_b v$ (forward mode), a Hessian-vector product $w = \nabla^2_z L_b \, u$ of the loss in
the output space, and a vector-Jacobian product $J_b^\top w$ (reverse mode); the rows of
$V$ are vectorised with `vmap`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, cast

from torch.func import grad, jvp, vjp, vmap

import torch

from ..autodiff.derivatives import (
    FunctionalModel,
    LossFunction,
    LossOrTask,
    operator_to_dense,
    unflatten,
    with_frozen,
)
from ..autodiff.hessian_products import HESSIAN_CHUNK_BUDGET
from ..autodiff.model_call import call_model, is_task, model_outputs
from ..autodiff.stateless import ForwardModeSerialised, MathAttentionOnFailure
from ..data.batches import TorchBatch
from .batch_operation import LossBatchOperation

__all__ = ["GeneralizedGaussNewtonBatchOperation"]

ParamDict = Dict[str, torch.Tensor]


class GeneralizedGaussNewtonBatchOperation(LossBatchOperation):
    r"""$V \mapsto V G_b$ with the generalized Gauss-Newton matrix of the batch,

    $$G_b = J_b^\top \, \nabla^2_z L_b(z_b) \, J_b ,$$

    see the [module description][influx.torch.curvature.generalized_gauss_newton]. Parameters of the
    model outside `restrict_to` (and buffers) are held fixed.

    Args:
        model: the model; its outputs are what the loss is applied to.
        loss: the loss function `loss(outputs, targets)`, mean reduction.
        restrict_to: the parameters; the operator is the corresponding sub-matrix.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        restrict_to: Optional[Dict[str, torch.nn.Parameter]] = None,
    ):
        if is_task(loss):
            raise TypeError(
                "Parameter 'loss': the generalized Gauss-Newton matrix separates the model's "
                "outputs from the loss and needs a function loss(outputs, y), got a task "
                f"({type(loss).__name__}); use the Hessian or the empirical Fisher "
                "(SecondOrderMode.GAUSS_NEWTON) with a task."
            )
        super().__init__(model, loss, restrict_to)

    def _rebuild(self) -> None:
        # the model's other parameters and buffers, read once (again after `to`)
        self._merge = with_frozen(self.params, self.model)
        # jvp: one thread at a time per process (see influx.torch.functional); the math
        # attention kernel where a fused one has no forward-mode derivative
        self._serialised_products = MathAttentionOnFailure(
            ForwardModeSerialised(self._products), "Generalized Gauss-Newton products"
        )

    def _output_function(self, x: Any) -> Callable[[ParamDict], torch.Tensor]:
        """$\\theta \\mapsto f_\\theta(x)$ with the other parameters and buffers fixed."""

        def outputs(p: ParamDict) -> torch.Tensor:
            forward = FunctionalModel(self.model, self._merge(p))
            return model_outputs(call_model(forward, x))  # type: ignore[no-any-return]

        return outputs

    def _apply(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        return self._serialised_products(batch, tensor)  # type: ignore[no-any-return]

    def _products(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        outputs = self._output_function(batch.x)
        params = self.params
        forward = vjp(outputs, params)
        z, pullback = forward[0], forward[1]

        def push_forward(v: torch.Tensor) -> torch.Tensor:
            return jvp(outputs, (params,), (unflatten(v, params),))[1]  # type: ignore[no-any-return]

        def output_loss(out: torch.Tensor) -> torch.Tensor:
            return cast(LossFunction, self.loss)(out, batch.y)

        loss_hvp = vjp(grad(output_loss), z.detach())[1]
        tangents = vmap(push_forward)(tensor.to(self.dtype))
        # The output Hessian is symmetric: its vector-Jacobian product is its product.
        (curved,) = vmap(loss_hvp)(tangents)
        (pulled,) = vmap(pullback)(curved)
        rows = tensor.shape[0]
        return torch.cat([pulled[name].reshape(rows, -1) for name in params], dim=1)

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        """The matrix `(P, P)` of the batch's GGN, from products with the columns of the
        identity, at most $\\max(1, \\lfloor 2^{17} / |b| \\rfloor)$ at a time."""
        chunk = max(1, HESSIAN_CHUNK_BUDGET // max(1, len(batch)))
        return operator_to_dense(
            lambda t: self._apply(batch, t), self.input_size, self.dtype, self.device, chunk
        )
