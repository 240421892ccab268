r"""The torch side of the functional facade: `TorchTwiceDifferentiable` and the registered
inversion methods.

Each function registered here for [solve_hvp][influx.inversion.solve_hvp] builds the
matching operator of `influx.torch` over the training data and applies it to $b$; the
operator's [SolverDiagnostics][influx.types.SolverDiagnostics] become the result's `info`.
"""

import dataclasses
import logging
import warnings
from typing import Any, Dict, Generator, List, Optional, Sequence, Tuple, Union

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import torch

from ...inversion import InversionMethod, InversionRegistry
from ...twice_differentiable import InverseHvpResult, TensorUtilities, TwiceDifferentiable
from ..autodiff.derivatives import LossFunction, flatten_dimensions
from ..composition.curvatures import Curvature, KroneckerCurvature, ModeCurvature
from ..composition.solvers import (
    ArnoldiSolver,
    CgSolver,
    DirectSolver,
    FactoredSolver,
    InverseHarmonicMeanSolver,
    LissaSolver,
    NystroemSolver,
    Solver,
)
from ..curvature.batch_operation import HessianBatchOperation
from ..curvature.operators import SecondOrderMode
from ..data.batches import TorchBatch
from ..data.blocks import BlockMode

__all__ = ["TorchTensorUtilities", "TorchTwiceDifferentiable"]

logger = logging.getLogger(__name__)


class TorchTwiceDifferentiable(TwiceDifferentiable[torch.Tensor]):  # type: ignore[type-var]
    r"""A torch model and loss as a twice-differentiable function of the model's parameters.

    $L(\theta) = \text{loss}(f_\theta(x), y)$ over the trainable parameters (those with
    `requires_grad=True`), flattened in `named_parameters()` order.

    Args:
        model: the model. A warning is issued if it is in training mode (dropout or batch
            norm would make the derivatives random or batch-dependent); call `model.eval()`.
        loss: the loss `loss(prediction, target)` with mean reduction.
    """

    def __init__(self, model: torch.nn.Module, loss: LossFunction):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Parameter 'model' must be a torch.nn.Module, got {type(model).__name__}."
            )
        if model.training:
            warnings.warn(
                "The model is in training mode: dropout and batch normalisation make its "
                "derivatives random or batch-dependent. Call model.eval() first.",
                UserWarning,
                stacklevel=2,
            )
        self.model = model
        self.loss = loss

    @classmethod
    def tensor_type(cls) -> type:
        return torch.Tensor

    @property
    def parameters(self) -> List[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def grad(self, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        x, y = x.to(self.device), y.to(self.device)
        value = self.loss(self.model(x), y)
        grads = torch.autograd.grad(value, self.parameters, create_graph=create_graph)
        return flatten_dimensions(grads)

    def hessian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return HessianBatchOperation(self.model, self.loss).to_dense(
            TorchBatch(x, y).to(self.device)
        )

    @staticmethod
    def mvp(
        grad_xy: torch.Tensor,
        v: torch.Tensor,
        backprop_on: Union[torch.Tensor, Sequence[torch.Tensor]],
        *,
        progress: bool = False,
    ) -> torch.Tensor:
        inputs = [backprop_on] if isinstance(backprop_on, torch.Tensor) else list(backprop_on)
        single = v.ndim == 1
        directions = v.unsqueeze(0) if single else v
        if directions.ndim != 2 or directions.shape[1] != grad_xy.numel():
            raise ValueError(
                f"Parameter 'v' must have shape ({grad_xy.numel()},) or (D, {grad_xy.numel()}) "
                f"to match 'grad_xy', got {tuple(v.shape)}."
            )
        rows = []
        for direction in tqdm(directions, disable=not progress, desc="mvp", leave=False):
            parts = torch.autograd.grad(
                grad_xy, inputs, grad_outputs=direction.reshape(grad_xy.shape), retain_graph=True
            )
            rows.append(flatten_dimensions(parts))
        result = torch.stack(rows)
        return result[0] if single else result


class TorchTensorUtilities(TensorUtilities[torch.Tensor, TorchTwiceDifferentiable]):  # type: ignore[type-var]
    """Tensor helpers for [TorchTwiceDifferentiable][influx.torch.legacy.inversion_methods.TorchTwiceDifferentiable]."""

    twice_differentiable_type = TorchTwiceDifferentiable

    @staticmethod
    def einsum(equation: str, *operands: Any) -> torch.Tensor:
        return torch.einsum(equation, *operands)

    @staticmethod
    def cat(a: Sequence[torch.Tensor], **kwargs: Any) -> torch.Tensor:
        return torch.cat(list(a), **kwargs)

    @staticmethod
    def stack(a: Sequence[torch.Tensor], **kwargs: Any) -> torch.Tensor:
        return torch.stack(list(a), **kwargs)

    @staticmethod
    def unsqueeze(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.unsqueeze(dim)

    @staticmethod
    def get_element(x: torch.Tensor, idx: int) -> torch.Tensor:
        return x[idx]

    @staticmethod
    def slice(x: torch.Tensor, start: int, stop: int, axis: int = 0) -> torch.Tensor:
        return x.narrow(axis, start, stop - start)

    @staticmethod
    def shape(x: torch.Tensor) -> Tuple[int, ...]:
        return tuple(x.shape)

    @staticmethod
    def reshape(x: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
        return x.reshape(shape)

    @staticmethod
    def cat_gen(
        a: Generator[torch.Tensor, None, None],
        resulting_shape: Tuple[int, ...],
        model: TorchTwiceDifferentiable,
    ) -> torch.Tensor:
        first = next(iter(model.model.parameters()))
        result = torch.empty(resulting_shape, dtype=first.dtype, device=first.device)
        start = 0
        for chunk in a:
            stop = start + chunk.shape[0]
            result[start:stop] = chunk
            start = stop
        if start != resulting_shape[0]:
            raise ValueError(
                f"Parameter 'a' yielded {start} rows, expected {resulting_shape[0]} from "
                f"'resulting_shape' {resulting_shape}."
            )
        return result


def _solve(
    model: TorchTwiceDifferentiable,
    training_data: DataLoader,
    b: torch.Tensor,
    regularization: float,
    curvature: Curvature,
    solver: Solver,
    name: str,
) -> InverseHvpResult:
    """Apply the composition of `curvature` and `solver` over all trainable parameters."""
    blocks = curvature.blocks(model.model, BlockMode.FULL)
    names = [n for n, p in model.model.named_parameters() if p.requires_grad]
    covered = [n for block in blocks.values() for n in block]
    if covered != names:
        raise ValueError(
            f"InversionMethod.{name} needs every trainable parameter in a supported layer, in "
            f"order; the model has {names}, the layers cover {covered}."
        )
    curvatures = curvature.fit(model.model, model.loss, training_data, blocks)
    single = b.ndim == 1
    rows = (b.unsqueeze(0) if single else b).to(model.device)
    sizes = [sum(p.numel() for p in block.values()) for block in blocks.values()]
    if rows.ndim != 2 or rows.shape[1] != sum(sizes):
        raise ValueError(
            f"Parameter 'b' must have shape ({sum(sizes)},) or (N, {sum(sizes)}), got "
            f"{tuple(b.shape)}."
        )
    parts, diagnostics = [], []
    for (block_name, block_curvature), part in zip(curvatures.items(), rows.split(sizes, dim=1)):
        op = solver.fit(block_curvature, regularization, block_name)
        parts.append(op.apply(part))
        diagnostics.append(op.diagnostics)
    x = torch.cat(parts, dim=1)
    info: Dict[str, Any] = (
        dataclasses.asdict(diagnostics[0]) if len(diagnostics) == 1 and diagnostics[0] else {}
    )
    if len(diagnostics) > 1:
        info = {
            "method": diagnostics[0].method if diagnostics[0] else name.lower(),
            "converged": all(d is None or d.converged for d in diagnostics),
            "iterations": None,
            "details": {"blocks": list(curvatures)},
        }
    return InverseHvpResult(x[0] if single else x, info)


_HESSIAN = ModeCurvature(SecondOrderMode.HESSIAN)


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Direct)
def solve_direct(
    model: TorchTwiceDifferentiable,
    training_data: DataLoader,
    b: torch.Tensor,
    hessian_perturbation: float = 0.0,
) -> InverseHvpResult:
    r"""$x = (H + \lambda I)^{-1} b$ with the dense Hessian, factorised
    ([DirectSolveOperator][influx.torch.inverse.direct.DirectSolveOperator])."""
    return _solve(model, training_data, b, hessian_perturbation, _HESSIAN, DirectSolver(), "Direct")


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Cg)
def solve_cg(
    model: TorchTwiceDifferentiable,
    training_data: DataLoader,
    b: torch.Tensor,
    hessian_perturbation: float = 0.0,
    **kwargs: Any,
) -> InverseHvpResult:
    r"""$x \approx (H + \lambda I)^{-1} b$ by conjugate gradient on Hessian-vector products
    ([CgOperator][influx.torch.inverse.cg.CgOperator]; `kwargs` are its parameters: `rtol`,
    `atol`, `maxiter`, `preconditioner`, `use_block_cg`, ...)."""
    if "use_block_cg" in kwargs:
        kwargs["solve_simultaneously"] = kwargs.pop("use_block_cg")
    return _solve(model, training_data, b, hessian_perturbation, _HESSIAN, CgSolver(**kwargs), "Cg")


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Lissa)
def solve_lissa(
    model: TorchTwiceDifferentiable,
    training_data: DataLoader,
    b: torch.Tensor,
    hessian_perturbation: float = 0.0,
    **kwargs: Any,
) -> InverseHvpResult:
    r"""$x \approx (H + \lambda I)^{-1} b$ by the LiSSA iteration over mini-batches of
    `training_data` ([LissaOperator][influx.torch.inverse.lissa.LissaOperator]; `kwargs` are its
    parameters: `maxiter`, `dampen`, `scale`, `rtol`, ...)."""
    return _solve(
        model, training_data, b, hessian_perturbation, _HESSIAN, LissaSolver(**kwargs), "Lissa"
    )


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Arnoldi)
def solve_arnoldi(
    model: TorchTwiceDifferentiable,
    training_data: DataLoader,
    b: torch.Tensor,
    hessian_perturbation: float = 0.0,
    *,
    rank: int = 10,
    krylov_dimension: Union[int, None] = None,
    tol: float = 1e-6,
    max_iter: Union[int, None] = None,
    use_woodbury: bool = False,
    progress: bool = False,
) -> InverseHvpResult:
    r"""$x \approx V (D + \lambda I)^{-1} V^\top b$ from the `rank` eigenpairs $V, D$ of largest
    magnitude of the Hessian ([lanczos_low_rank][influx.torch.inverse.low_rank_approximation.lanczos_low_rank]);
    with `use_woodbury=True` the exact inverse of $V D V^\top + \lambda I$ instead. Exact at
    full rank."""
    solver = ArnoldiSolver(rank, krylov_dimension, tol, max_iter, use_woodbury, progress)
    return _solve(model, training_data, b, hessian_perturbation, _HESSIAN, solver, "Arnoldi")


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Nystroem)
def solve_nystroem(
    model: TorchTwiceDifferentiable,
    training_data: DataLoader,
    b: torch.Tensor,
    hessian_perturbation: float = 0.0,
    *,
    rank: int = 10,
    seed: Optional[int] = None,
) -> InverseHvpResult:
    r"""$x \approx (\hat H + \lambda I)^{-1} b$ with a randomized Nyström sketch $\hat H$ of rank
    `rank` of the Hessian ([nystroem_low_rank][influx.torch.inverse.low_rank_approximation.nystroem_low_rank]),
    inverted by Woodbury (needs $\lambda > 0$). The Hessian must be positive semi-definite for
    the sketch to be exact at full rank."""
    solver = NystroemSolver(rank, seed)
    return _solve(model, training_data, b, hessian_perturbation, _HESSIAN, solver, "Nystroem")


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.InverseHarmonicMean)
def solve_inverse_harmonic_mean(
    model: TorchTwiceDifferentiable,
    training_data: DataLoader,
    b: torch.Tensor,
    hessian_perturbation: float = 0.0,
    *,
    progress: bool = False,
) -> InverseHvpResult:
    r"""$x = \frac{1}{n}\sum_i (g_i g_i^\top + \lambda I)^{-1} b$, the inverse harmonic mean
    (DataInf) approximation of the inverse Gauss-Newton matrix; needs $\lambda > 0$
    ([InverseHarmonicMeanOperator][influx.torch.inverse.inverse_harmonic_mean.InverseHarmonicMeanOperator])."""
    curvature = ModeCurvature(SecondOrderMode.GAUSS_NEWTON)
    solver = InverseHarmonicMeanSolver(progress)
    solver.check_regularization(hessian_perturbation, ["model"])
    return _solve(
        model, training_data, b, hessian_perturbation, curvature, solver, "InverseHarmonicMean"
    )


@InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Ekfac)
def solve_ekfac(
    model: TorchTwiceDifferentiable,
    training_data: DataLoader,
    b: torch.Tensor,
    hessian_perturbation: float = 0.0,
    *,
    update_diagonal: bool = True,
    progress: bool = False,
) -> InverseHvpResult:
    r"""$x \approx (\hat F + \lambda I)^{-1} b$ with the layer-wise Kronecker-factored
    approximation $\hat F$ (EK-FAC, or K-FAC with `update_diagonal=False`) of the empirical
    Fisher ([KroneckerCurvature][influx.torch.composition.curvatures.KroneckerCurvature]). Every
    trainable parameter must belong to a supported layer (`nn.Linear`, `nn.Conv2d`)."""
    curvature = KroneckerCurvature(update_diagonal, progress=progress)
    return _solve(
        model, training_data, b, hessian_perturbation, curvature, FactoredSolver(), "Ekfac"
    )
