r"""A Kronecker-factored approximate inverse of a block's curvature, for preconditioning.

Given a curvature operator $C$ on a block of parameters that carries its model, loss and
training data (an [AveragingBatchOperator][influx.torch.curvature.operators.AveragingBatchOperator]: the
Hessian, Gauss-Newton or generalized Gauss-Newton operator), the block's coordinates are split
into

* the parameters of the `nn.Linear` and `nn.Conv2d` layers of the block, each layer
  approximated by EK-FAC (or K-FAC) as in [influx.torch.kfac.factors][influx.torch.kfac.factors],
  $F_\ell \approx Q_\ell \,\mathrm{diag}(s_\ell)\, Q_\ell^\top$ with
  $Q_\ell = Q_G \otimes Q_A$;
* the remaining parameters (other layer types), approximated by the diagonal of $C$
  (Hutchinson's estimate, as in [JacobiPreconditioner][influx.torch.inverse.preconditioner.JacobiPreconditioner])
  or by the identity.

The approximate inverse is block diagonal over these groups:

$$
P^{-1}_\lambda = \mathrm{blockdiag}\Big(
  Q_\ell \,\mathrm{diag}(s_\ell + \lambda)^{-1} Q_\ell^\top \;(\text{each layer } \ell),\;
  \mathrm{diag}(\hat d + \lambda)^{-1}\Big) .
$$

Only $1/(s + \lambda)$ depends on $\lambda$: the factors, eigenbases and diagonal are fitted
once. A curvature operator without model and data (e.g. a dense matrix) gets the diagonal
on all of its coordinates.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch

from ..curvature.operators import AveragingBatchOperator
from ..curvature.tensor_operator import TensorOperator
from .factors import FISHER_TYPES, fit_kronecker_curvature, validate_fisher
from .layers import LayerSpec, layers_for_parameters
from .operators import KroneckerFactoredOperator

__all__ = [
    "FALLBACKS",
    "KroneckerBlockInverse",
    "fit_kronecker_block_inverse",
    "validate_kronecker_options",
]

logger = logging.getLogger(__name__)

FALLBACKS = ("jacobi", "identity")
"""How coordinates outside `Linear` / `Conv2d` layers are preconditioned."""

EIGENVALUE_FLOOR = 1e-6
"""Kronecker eigenvalues below this fraction of their layer's mean (or below the rounding
level of their largest) are raised to it, so that $P^{-1}$ stays finite and positive
definite at $\\lambda = 0$."""

DIAGONAL_FLOOR = 1e-2
"""Diagonal estimates below this fraction of their mean absolute value are raised to it (as
in the Jacobi preconditioner)."""


class KroneckerBlockInverse:
    r"""$P^{-1}_\lambda$ of the module description for one block, fitted; apply it with `solve`.

    Args:
        size: the block size $P$.
        layers: per layer, the unregularized
            [KroneckerFactoredOperator][influx.torch.kfac.operators.KroneckerFactoredOperator] and the
            positions `(P_\ell,)` of its flat parameters (weight, then bias) in the block.
        diagonal: the diagonal estimate $\hat d$ on the other coordinates, None for the
            identity there.
        rest: the positions of the other coordinates.
    """

    def __init__(
        self,
        size: int,
        layers: Dict[str, Tuple[KroneckerFactoredOperator, torch.Tensor]],
        diagonal: Optional[torch.Tensor],
        rest: torch.Tensor,
    ):
        self.size = size
        self.layers = layers
        self.diagonal = diagonal
        self.rest = rest
        self._regularized: Dict[Optional[float], Dict[str, KroneckerFactoredOperator]] = {}

    def _operators(self, regularization: Optional[float]) -> Dict[str, KroneckerFactoredOperator]:
        if regularization not in self._regularized:
            if len(self._regularized) >= 4:
                self._regularized.clear()
            self._regularized[regularization] = {
                name: op.with_regularization(regularization)
                for name, (op, _) in self.layers.items()
            }
        return self._regularized[regularization]

    def solve(self, rhs: torch.Tensor, regularization: Optional[float]) -> torch.Tensor:
        """Apply $P^{-1}_\\lambda$ to the rows of `rhs` `(N, P)`."""
        result = torch.empty_like(rhs)
        if rhs.shape[0] == 0:
            return result
        for name, op in self._operators(regularization).items():
            index = self.layers[name][1]
            result[:, index] = op.apply(rhs[:, index]).to(rhs.dtype)
        if self.rest.numel():
            part = rhs[:, self.rest]
            if self.diagonal is not None:
                part = part / (self.diagonal + (regularization or 0.0))
            result[:, self.rest] = part
        return result

    @property
    def layer_names(self) -> List[str]:
        """The layers with a Kronecker-factored inverse."""
        return list(self.layers)


def _positions(structure: Dict[str, Tuple[int, ...]]) -> Dict[str, torch.Tensor]:
    """The positions of every parameter's entries in the flat block vector."""
    result: Dict[str, torch.Tensor] = {}
    start = 0
    for name, shape in structure.items():
        size = int(torch.Size(shape).numel())
        result[name] = torch.arange(start, start + size)
        start += size
    return result


def _estimate_diagonal(
    operator: TensorOperator,
    rest: torch.Tensor,
    num_samples: int,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    r"""Hutchinson's estimate of the diagonal of $C$ on the coordinates `rest`, floored.

    Probes are Rademacher on `rest` and zero elsewhere, so the estimate on `rest` is that of
    the sub-matrix $C_{\text{rest}, \text{rest}}$: unbiased, exact if it is diagonal.
    """
    probes = torch.zeros(num_samples, operator.input_size, dtype=operator.dtype)
    signs = torch.randint(0, 2, (num_samples, rest.numel()), generator=generator)
    probes[:, rest] = (2 * signs - 1).to(operator.dtype)
    probes = probes.to(operator.device)
    estimate = (probes * operator.apply(probes)).mean(dim=0)[rest.to(operator.device)]
    if not bool(torch.isfinite(estimate).all()):
        raise ValueError("EkfacPreconditioner: the curvature operator produced NaN or Inf.")
    floor = DIAGONAL_FLOOR * float(estimate.abs().mean())
    return torch.clamp(estimate, min=floor if floor > 0 else 1.0)


def _layer_operator(
    spec: LayerSpec,
    eigenvectors: Tuple[torch.Tensor, torch.Tensor],
    eigenvalues: torch.Tensor,
    method: str,
    dtype: torch.dtype,
    device: torch.device,
) -> KroneckerFactoredOperator:
    mean, largest = float(eigenvalues.mean()), float(eigenvalues.max())
    # Above the rounding level at which KroneckerFactoredOperator zeroes an inverse.
    rounding = 2.0 * eigenvalues.numel() * torch.finfo(torch.float64).eps * largest
    floor = max(EIGENVALUE_FLOOR * mean, rounding)
    floored = eigenvalues.clamp_min(floor if floor > 0 else 1.0)
    return KroneckerFactoredOperator(
        eigenvectors[0].to(device),
        eigenvectors[1].to(device),
        floored.to(device),
        None,
        spec.weight_name,
        spec.weight_shape,
        spec.bias_name,
        method=method,
        dtype=dtype,
        layer_name=spec.name,
        weight_transposed=spec.weight_transposed,
        warn_on_ill_conditioning=False,  # CG checks the conditioning of what it solves
    )


def fit_kronecker_block_inverse(
    operator: TensorOperator,
    update_diagonal: bool = True,
    fisher: str = "empirical",
    fallback: str = "jacobi",
    num_samples_estimator: int = 1,
    seed: Optional[int] = None,
    progress: bool = False,
    max_cache_mb: float = 256.0,
) -> KroneckerBlockInverse:
    """Fit the [KroneckerBlockInverse][influx.torch.kfac.preconditioner.KroneckerBlockInverse]
    of a curvature operator (see the module description).

    Args:
        operator: the curvature operator $C$ of the block.
        update_diagonal: refit the eigenvalues (EK-FAC) instead of the K-FAC products.
        fisher: `"empirical"` (training labels) or `"sampled"` (labels drawn from the model,
            cross-entropy only), see [influx.torch.kfac.factors][influx.torch.kfac.factors].
        fallback: `"jacobi"` or `"identity"`, for coordinates outside supported layers.
        num_samples_estimator: probes of the diagonal estimate (`"jacobi"`).
        seed: seed of the label sampling and of the probes; None uses torch's global state
            for the probes and a fresh generator for the labels.
        progress: show progress bars over the batches.
        max_cache_mb: memory for the signals of the first pass, saving the refit's pass
            (empirical Fisher only: a sampled Fisher refits on fresh label draws).

    Raises:
        ValueError: for an unknown `fisher` or `fallback`, or `fisher="sampled"` with a loss
            that is not the cross-entropy.
    """
    validate_kronecker_options(fisher, fallback)
    size = operator.input_size
    device, dtype = operator.device, operator.dtype
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    batch_operation = getattr(operator, "batch_operation", None)
    loss = getattr(batch_operation, "loss", None)
    covered: List[torch.Tensor] = []
    layers: Dict[str, Tuple[KroneckerFactoredOperator, torch.Tensor]] = {}
    if isinstance(operator, AveragingBatchOperator) and loss is not None:
        fisher = validate_fisher(fisher, loss)
        model = operator.batch_operation.model
        structure = operator.input_dict_structure
        specs = layers_for_parameters(model, structure)
        if specs:
            sampler = None
            if fisher == "sampled" and seed is not None:
                sampler = torch.Generator(device=device).manual_seed(seed)
            _, bases, eigenvalues = fit_kronecker_curvature(
                model,
                specs,
                operator.dataloader,
                loss,
                fisher,
                update_diagonal,
                sampler,
                progress,
                max_cache_mb,
            )
            positions = _positions(structure)
            method = "ekfac" if update_diagonal else "kfac"
            for name, spec in specs.items():
                basis = bases[name]
                index = torch.cat([positions[p] for p in spec.parameter_names])
                vectors = (basis.input_eigenvectors, basis.output_eigenvectors)
                op = _layer_operator(spec, vectors, eigenvalues[name], method, dtype, device)
                layers[name] = (op, index.to(device))
                covered.append(index)
        else:
            logger.info(
                "EkfacPreconditioner: no Linear or Conv2d layer in the block; using the %s "
                "preconditioner for all of its parameters.",
                fallback,
            )
    else:
        logger.warning(
            "EkfacPreconditioner: the curvature operator %s carries no model, loss and data; "
            "using the %s preconditioner for all of its %d coordinates.",
            type(operator).__name__,
            fallback,
            size,
        )
    mask = torch.ones(size, dtype=torch.bool)
    for index in covered:
        mask[index] = False
    rest = torch.nonzero(mask).squeeze(1)
    diagonal = None
    if fallback == "jacobi" and rest.numel():
        diagonal = _estimate_diagonal(operator, rest, num_samples_estimator, generator)
    return KroneckerBlockInverse(size, layers, diagonal, rest.to(device))


def validate_kronecker_options(fisher: str, fallback: str) -> None:
    """Raise a ValueError naming the parameter for an unknown `fisher` or `fallback`."""
    if fisher not in FISHER_TYPES:
        raise ValueError(f"Parameter 'fisher' must be one of {list(FISHER_TYPES)}, got {fisher!r}.")
    if fallback not in FALLBACKS:
        raise ValueError(
            f"Parameter 'fallback' must be one of {list(FALLBACKS)}, got {fallback!r}."
        )
