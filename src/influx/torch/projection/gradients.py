r"""Projected per-sample gradients and the curvature in the projected space.

A [ProjectedGradientProvider][influx.torch.projection.gradients.ProjectedGradientProvider]
gives the per-sample gradients of a block projected by its
[BlockProjection][influx.torch.projection.projections.BlockProjection];
[ProjectedCurvature][influx.torch.projection.gradients.ProjectedCurvature] builds
$P_b C_b P_b^\top$ from them in one pass over the data. Together with the direct solve they
are the parts of [ProjectedInfluence][influx.torch.models.projected.ProjectedInfluence].

Batches may be structured and the loss a [Task][influx.torch.data.task.Task], as everywhere: the
model is called as [call_model][influx.torch.autodiff.model_call.call_model] says (or as the task calls
it), and the recorder of layer calls sees whatever the forward pass feeds the Kronecker layers.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, cast

from torch.func import jacrev, vmap

import torch

from ..autodiff.derivatives import FunctionalModel, LossFunction
from ..autodiff.model_call import LossOrTask, call_model, is_task, model_outputs, task_objective
from ..autodiff.stateless import structure_signature
from ..composition.curvatures import Curvature
from ..curvature.operators import SecondOrderMode, check_second_order_mode
from ..curvature.tensor_operator import MatrixOperator, TensorOperator
from ..data.batches import TorchBatch, iterate_batches
from ..data.state import OperatorState, StateContext
from ..data.structures import map_structure
from ..data.validation import check_finite
from ..gradients.provider import TorchGradientProvider
from ..kfac.signals import LayerCalls, LayerRecordingError
from .projections import BlockProjection

__all__ = [
    "IdentityOperator",
    "ProjectedCurvature",
    "ProjectedGradientProvider",
    "output_hessians",
]

logger = logging.getLogger(__name__)

SAMPLE_CHUNK_ELEMENTS = 2**24
"""Budget (numbers) of the explicit per-sample gradients of one sub-batch (dense path)."""


class ProjectedGradientProvider(TorchGradientProvider):
    r"""Projected per-sample gradients $P_b \nabla_{\theta_b} \ell_i$ of one block, `(N, k)`.

    Kronecker layers are projected from their inputs and output gradients, recorded on one
    forward and one backward pass of this thread by
    [LayerCalls][influx.torch.kfac.signals.LayerCalls] (on the thread's copy of the module, see
    [functional_forward][influx.torch.autodiff.stateless.functional_forward]);
    the other parameters from their explicit per-sample gradients, in sub-batches. Mixed
    derivatives (for `Perturbation`) are formed explicitly and projected.

    The gradients of a test batch are those of a task's measurement, unless `training_side`
    is set (see [training_side_copy][influx.torch.projection.gradients.ProjectedGradientProvider.training_side_copy]).

    Args:
        model: the model.
        loss: the loss function `loss(outputs, y)` with mean reduction, or a
            [Task][influx.torch.data.task.Task].
        restrict_to: the block's parameters.
        projection: the block's projection.
        block_name: the block's name, for messages.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        restrict_to: Dict[str, torch.nn.Parameter],
        projection: BlockProjection,
        block_name: Optional[str] = None,
    ):
        super().__init__(model, loss, restrict_to, block_name)
        self.projection = projection
        self.training_side = False
        """Whether test batches get the gradients of the training loss too."""
        dense = {n: self.params[n] for n in projection.dense_names}
        self._dense_provider = (
            TorchGradientProvider(model, loss, dense, block_name)  # type: ignore[arg-type]
            if dense
            else None
        )

    @property
    def input_size(self) -> int:
        return self.projection.dim

    def training_side_copy(self) -> "ProjectedGradientProvider":
        r"""A copy whose gradients are those of the training loss $\ell$ for every batch, test
        batches included (never of a task's measurement): the training side of the influence,
        as a store of training gradients needs it."""
        new = copy.copy(self)
        new.training_side = True
        return new

    def _side(self, batch: TorchBatch) -> TorchBatch:
        """The batch as this provider differentiates it (a training batch if
        `training_side`)."""
        return TorchBatch(batch.x, batch.y) if batch.test and self.training_side else batch

    def to(self, device: torch.device) -> "ProjectedGradientProvider":
        super().to(device)
        if self._dense_provider is not None:
            self._dense_provider.to(device)
        return self

    def _tensors(self) -> Dict[str, torch.Tensor]:
        """Every parameter and buffer, the block's Kronecker layers' as fresh leaves."""
        tensors = {
            n: t.detach()
            for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
        }
        for layer in self.projection.layers.values():
            for name in layer.spec.parameter_names:
                tensors[name] = tensors[name].requires_grad_(True)
        return tensors

    def _functional_model(self) -> FunctionalModel:
        """The module evaluated with `_tensors()` (the block's Kronecker layers' as leaves)."""
        return FunctionalModel(self.model, self._tensors())

    def _forward(self, run: Callable[[FunctionalModel], Any]) -> Tuple[Any, Dict[str, List[Any]]]:
        """`run(f)` for the module as a callable `f` (the loss or measurement of a batch, or
        the model's outputs), with the inputs and outputs of every Kronecker layer's calls
        (recorded by [LayerCalls][influx.torch.kfac.signals.LayerCalls])."""
        functional = self._functional_model()
        specs = {name: layer.spec for name, layer in self.projection.layers.items()}
        calls = LayerCalls(self.model, specs, functional.signature)
        with torch.enable_grad(), calls:
            outputs = run(functional)
        try:
            calls.check()
        except LayerRecordingError as error:
            raise LayerRecordingError(
                f"{error} Block {self.block_name!r}: use projection='gaussian' for parameters "
                "used functionally."
            ) from None
        return outputs, calls.calls

    def _project_layers(
        self, records: Dict[str, List[Any]], grads: Sequence[Optional[torch.Tensor]], scale: float
    ) -> List[torch.Tensor]:
        pieces, position = [], 0
        for name, layer in self.projection.layers.items():
            total: Optional[torch.Tensor] = None
            for inp, _ in records[name]:  # a layer called several times: sum the calls
                g = grads[position]
                position += 1
                if g is None:
                    continue
                term = layer.project_raw(inp, g.detach())
                total = term if total is None else total + term
            if total is None:
                total = records[name][0][0].new_zeros(len(records[name][0][0]), layer.dim)
            pieces.append(total.mul_(scale))
        return pieces

    def _dense_flat(
        self, batch: TorchBatch, function: Callable[[TorchBatch], torch.Tensor]
    ) -> torch.Tensor:
        assert self.projection.dense is not None
        step = max(1, SAMPLE_CHUNK_ELEMENTS // max(1, self.projection.dense.size))
        parts = []
        for sub in batch.chunks(step):
            parts.append(self.projection.dense.apply(function(sub)))
        return torch.cat(parts)

    def flat_grads(self, batch: TorchBatch) -> torch.Tensor:
        batch = self._side(batch)
        pieces: List[torch.Tensor] = []
        if self.projection.layers:
            objective = task_objective(self.loss, measurement=batch.test)
            value, records = self._forward(lambda f: objective(f, batch.x, batch.y))
            flat_outputs = [out for calls in records.values() for _, out in calls]
            grads = torch.autograd.grad(value, flat_outputs, allow_unused=True)
            pieces.extend(self._project_layers(records, grads, float(len(batch))))
        if self._dense_provider is not None:
            pieces.append(self._dense_flat(batch, self._dense_provider.flat_grads))
        result = torch.cat(pieces, dim=1)
        check_finite({"projected": result}, "projected per-sample gradients", self.block_name)
        return result

    def grads(self, batch: TorchBatch) -> Dict[str, torch.Tensor]:
        """The projected gradients under the key `"projected"`."""
        return {"projected": self.flat_grads(batch)}

    def flat_mixed_grads(self, batch: TorchBatch) -> torch.Tensor:
        """$P_b \\nabla_x \\nabla_{\\theta_b} \\ell_i$, `(N, F, k)`, from the explicit mixed
        derivatives (`(N, F, p_b)` numbers per batch)."""
        explicit = TorchGradientProvider.mixed_grads(self, batch)
        return self.projection.project_flat(torch.cat(list(explicit.values()), dim=-1))

    def mixed_grads(self, batch: TorchBatch) -> Dict[str, torch.Tensor]:
        return {"projected": self.flat_mixed_grads(batch)}

    def jacobian_prod(self, batch: TorchBatch, g: torch.Tensor) -> torch.Tensor:
        if g.ndim != 2 or g.shape[1] != self.input_size:
            raise ValueError(
                f"Parameter 'g' must have shape (K, {self.input_size}), got {tuple(g.shape)}."
            )
        return self.flat_grads(batch) @ g.to(self.projection_dtype).T

    @property
    def projection_dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def output_jacobians(self, batch: TorchBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""The projected per-sample Jacobians $P_b J_i^\top$ of the model's outputs, `(N, O, k)`,
        and the outputs `(N, *out)` (detached)."""
        pieces: List[torch.Tensor] = []
        outputs: Optional[torch.Tensor] = None

        def model_output(f: FunctionalModel) -> torch.Tensor:
            return model_outputs(call_model(f, batch.x))  # type: ignore[no-any-return]

        if self.projection.layers:
            outputs, records = self._forward(model_output)
            flat = outputs.reshape(len(batch), -1)
            flat_outputs = [out for calls in records.values() for _, out in calls]
            per_output = []
            for o in range(flat.shape[1]):
                grads = torch.autograd.grad(
                    flat[:, o].sum(), flat_outputs, retain_graph=True, allow_unused=True
                )
                per_output.append(torch.cat(self._project_layers(records, grads, 1.0), dim=1))
            pieces.append(torch.stack(per_output, dim=1))
            outputs = outputs.detach()
        if self.projection.dense is not None:
            pieces.append(self._dense_flat(batch, self._dense_output_jacobian))
        if outputs is None:
            outputs = model_output(self._functional_model()).detach()
        return torch.cat(pieces, dim=-1), outputs

    def _dense_output_jacobian(self, batch: TorchBatch) -> torch.Tensor:
        names = self.projection.dense_names
        tensors = self._tensors()
        fixed = {n: t.detach() for n, t in tensors.items() if n not in names}
        params = {n: tensors[n].detach() for n in names}
        signature = structure_signature(self.model)

        def outputs(p: Dict[str, torch.Tensor], x: Any) -> torch.Tensor:
            f = FunctionalModel(self.model, {**fixed, **p}, signature)
            one = map_structure(lambda t: t.unsqueeze(0), x)
            return model_outputs(call_model(f, one)).reshape(-1)  # type: ignore[no-any-return]

        jac = vmap(jacrev(outputs), in_dims=(None, 0))(params, batch.x)
        n_out = next(iter(jac.values())).shape[1]
        return torch.cat([jac[n].reshape(len(batch), n_out, -1) for n in names], dim=-1)


def output_hessians(loss: LossFunction, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
    r"""$\nabla^2_{z_i} \ell(z_i, y_i)$ of every sample, `(N, O, O)`, the loss applied to one
    sample at a time (reverse-over-reverse); `targets` a tensor or a structure of tensors."""
    shape = outputs.shape[1:]

    def sample_loss(z: torch.Tensor, y: Any) -> torch.Tensor:
        return loss(z.reshape(1, *shape), map_structure(lambda t: t.unsqueeze(0), y))

    flat = outputs.reshape(outputs.shape[0], -1)
    return vmap(jacrev(jacrev(sample_loss)))(flat, targets)  # type: ignore[no-any-return]


class ProjectedCurvature(Curvature):
    r"""The curvature of every block in its projected space, $P_b C_b P_b^\top$ `(k, k)`.

    One pass over the data: for `GAUSS_NEWTON` the mean of $(P_b g_i)(P_b g_i)^\top$, $g_i$ the
    gradient of a loss function or of a task's loss; for `GENERALIZED_GAUSS_NEWTON` the mean of
    $(P_b J_i^\top) H_i (J_i P_b^\top)$ with $J_i$ the Jacobian of sample $i$'s outputs and
    $H_i$ the Hessian of its loss in them (one backward pass per output coordinate), which
    needs a loss function `loss(outputs, y)`. Each batch's term is computed in the model's
    dtype and accumulated in float64.

    Args:
        mode: `GAUSS_NEWTON` or `GENERALIZED_GAUSS_NEWTON`.
        projection_dim: $k$ per block; None: the default rule
            ([default_projection_dim][influx.torch.projection.projections.default_projection_dim]).
        projection: one of [PROJECTIONS][influx.torch.projection.projections.PROJECTIONS].
        seed: the seed of the projections.
        orthogonal: orthogonal rows.
        max_cache_mb: budget of a dense projection kept in memory.
    """

    def __init__(
        self,
        mode: SecondOrderMode,
        projection_dim: Optional[int],
        projection: str = "kronecker",
        seed: int = 0,
        orthogonal: bool = True,
        max_cache_mb: float = 256.0,
    ):
        self.mode = check_second_order_mode(mode)
        if self.mode is SecondOrderMode.HESSIAN:
            raise ValueError(
                "Parameter 'second_order_mode' must be GAUSS_NEWTON or GENERALIZED_GAUSS_NEWTON "
                "for projected influence, got HESSIAN."
            )
        self.projection_dim, self.projection = projection_dim, projection
        self.seed, self.orthogonal, self.max_cache_mb = seed, orthogonal, max_cache_mb
        self._providers: Dict[str, ProjectedGradientProvider] = {}

    def check_loss(self, loss: LossOrTask) -> None:
        """Check that `loss` can define this curvature.

        Raises:
            TypeError: for a task with `GENERALIZED_GAUSS_NEWTON`, which separates the model's
                outputs from the loss.
        """
        if self.mode is SecondOrderMode.GENERALIZED_GAUSS_NEWTON and is_task(loss):
            raise TypeError(
                "Parameter 'loss': the generalized Gauss-Newton matrix separates the model's "
                "outputs from the loss and needs a function loss(outputs, y), got a task "
                f"({type(loss).__name__}); use second_order_mode=GAUSS_NEWTON (the empirical "
                "Fisher) with a task."
            )

    def gradient_provider(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        block_name: str,
        params: Dict[str, torch.nn.Parameter],
    ) -> ProjectedGradientProvider:
        """The projected gradients of a block (built once per block)."""
        provider = self._providers.get(block_name)
        if provider is None or provider.model is not model:
            projection = BlockProjection(
                model,
                params,  # type: ignore[arg-type]
                self.projection_dim,
                self.projection,
                self.seed,
                block_name,
                self.orthogonal,
                self.max_cache_mb,
            )
            provider = ProjectedGradientProvider(model, loss, params, projection, block_name)
            self._providers[block_name] = provider
        return provider

    def fit(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        data: Iterable,
        blocks: "OrderedDict[str, Dict[str, torch.nn.Parameter]]",
    ) -> "OrderedDict[str, TensorOperator]":
        self.check_loss(loss)
        function = cast(LossFunction, loss)  # a function wherever it is called as one
        providers = {n: self.gradient_provider(model, loss, n, p) for n, p in blocks.items()}
        sums: Dict[str, torch.Tensor] = {}
        device = next(model.parameters()).device
        count = 0
        for batch in iterate_batches(data, device):
            count += len(batch)
            for name, provider in providers.items():
                if self.mode is SecondOrderMode.GAUSS_NEWTON:
                    g = provider.flat_grads(batch)
                    term = (g.T @ g).to(torch.float64)
                else:
                    jac, outputs = provider.output_jacobians(batch)
                    hess = output_hessians(function, outputs, batch.y)
                    curved = hess.to(jac.dtype) @ jac
                    term = (jac.flatten(0, 1).T @ curved.flatten(0, 1)).to(torch.float64)
                sums[name] = term if name not in sums else sums[name].add_(term)
        if count == 0:
            raise ValueError("Parameter 'data' yielded no batches.")
        dtype = next(model.parameters()).dtype
        result: "OrderedDict[str, TensorOperator]" = OrderedDict()
        for name in blocks:
            matrix = sums[name] / count
            result[name] = MatrixOperator(((matrix + matrix.T) / 2).to(dtype))
        return result


class IdentityOperator(TensorOperator):
    """The identity on vectors of size `size`: the influence factors of a composition with this
    operator are the gradients themselves (used to store projected training gradients).

    Args:
        size: the input size.
        dtype: the dtype of the results.
        device: the device of the results.
    """

    supports_regularization = False

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self._size, self._dtype, self._device = int(size), dtype, torch.device(device)

    @property
    def input_size(self) -> int:
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device) -> "IdentityOperator":
        self._device = torch.device(device)
        return self

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._dtype)

    def export_state(self) -> OperatorState:
        return OperatorState(
            "IdentityOperator",
            settings={"size": self._size, "dtype": str(self._dtype).split(".")[-1]},
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "IdentityOperator":
        dtype = getattr(torch, state.settings["dtype"])
        device = torch.device("cpu")
        if context.params:
            device = next(iter(context.params.values())).device
        return cls(state.settings["size"], dtype, device)
