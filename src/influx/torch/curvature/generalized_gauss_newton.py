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
$V$ are vectorised with `vmap`. For a model with recurrent layers, whose fused kernels
`torch.func` cannot transform (packed sequences included), the same three steps run with
`torch.autograd`, one row at a time: $J_b v$ as the derivative of $(J_b^\top u)^\top v$ with
respect to a dummy $u$ (reverse over reverse), which needs no forward mode.
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
from ..autodiff.model_call import (
    call_model,
    is_task,
    model_outputs,
    vmap_unsupported_modules,
)
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
        products = (
            self._products_by_autograd
            if vmap_unsupported_modules(self.model)
            else ForwardModeSerialised(self._products)
        )
        self._serialised_products = MathAttentionOnFailure(
            products, "Generalized Gauss-Newton products"
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

    def _products_by_autograd(self, batch: TorchBatch, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of `tensor` times $G_b$ with `torch.autograd` only (recurrent kernels)."""
        names = list(self.params)
        rows = tensor.to(self.dtype)
        result = torch.zeros_like(rows)
        with torch.enable_grad():
            leaves = [self.params[n].detach().requires_grad_(True) for n in names]
            z = self._output_function(batch.x)(dict(zip(names, leaves)))
            # J^T u for a dummy u, with its graph: its derivative along v in u is J v
            dummy = torch.zeros_like(z, requires_grad=True)
            pulled_dummy = torch.autograd.grad(
                z, leaves, dummy, create_graph=True, allow_unused=True
            )
            used = [i for i, g in enumerate(pulled_dummy) if g is not None]
            if rows.shape[0] == 0 or not used:
                return result
            out = z.detach().requires_grad_(True)
            (out_grad,) = torch.autograd.grad(
                cast(LossFunction, self.loss)(out, batch.y), out, create_graph=True
            )
            for k, row in enumerate(rows):
                tangent = unflatten(row, self.params)
                (pushed,) = torch.autograd.grad(
                    [pulled_dummy[i] for i in used],
                    dummy,
                    [tangent[names[i]] for i in used],
                    retain_graph=True,
                )
                (curved,) = torch.autograd.grad(out_grad, out, pushed, retain_graph=True)
                pulled = torch.autograd.grad(
                    z, leaves, curved, retain_graph=True, allow_unused=True
                )
                result[k] = torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(leaf)).reshape(-1)
                        for g, leaf in zip(pulled, leaves)
                    ]
                )
        return result

    def to_dense(self, batch: TorchBatch) -> torch.Tensor:
        """The matrix `(P, P)` of the batch's GGN, from products with the columns of the
        identity, at most $\\max(1, \\lfloor 2^{17} / |b| \\rfloor)$ at a time."""
        chunk = max(1, HESSIAN_CHUNK_BUDGET // max(1, len(batch)))
        return operator_to_dense(
            lambda t: self._apply(batch, t), self.input_size, self.dtype, self.device, chunk
        )
