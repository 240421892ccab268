r"""LiSSA: the stochastic fixed-point iteration of Agarwal et al. (2017) for
$(A + \lambda I)x = b$, one mini-batch per step.

[lissa][influx.torch.inverse.lissa.lissa] is the iteration on rows of a tensor `(N, P)`;
[LissaOperator][influx.torch.inverse.lissa.LissaOperator] wraps it as an operator that records what it
achieved in its `diagnostics` after each `apply`.
"""

from __future__ import annotations

import functools
import logging
from itertools import islice
from typing import Any, Callable, Iterator, Optional, Tuple, Union

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import torch

from ...errors import InfluxError
from ..curvature.batch_operation import BatchOperation
from ..curvature.conditioning import block_prefix, check_eigenvalue_conditioning
from ..curvature.tensor_operator import TensorOperator
from ..data.batches import TorchBatch, endless_batches, iterate_batches
from ..data.state import OperatorState, StateContext, restore_operator
from ..data.validation import (
    check_nonconvergence_policy,
    check_rows,
    check_seed,
    make_generator,
    validate_lissa_settings,
    validate_regularization,
)
from .solution import IterativeSolution, diagnostics_of, report_non_convergence
from .spectrum import estimate_largest_eigenvalue, lanczos_extreme_eigenvalues

__all__ = [
    "LissaDivergenceError",
    "lissa",
    "LissaOperator",
]

logger = logging.getLogger(__name__)

RowMap = Callable[[torch.Tensor], torch.Tensor]

AUTO_SCALE_FACTOR = 1.5
"""With `scale="auto"`, LiSSA's scale is this factor times the estimated largest eigenvalue of
$A_b + \\lambda I$ over a few batches $b$."""

AUTO_SCALE_BATCHES = 3
"""With `scale="auto"`, the number of batches on which the largest eigenvalue is estimated."""


class LissaDivergenceError(InfluxError, ValueError):
    """Raised when the LiSSA iteration diverges: its scale is too small for the curvature, or
    the regularized curvature has negative eigenvalues (then no scale helps).

    Attributes:
        smallest_eigenvalue: when diagnosed by
            [LissaOperator][influx.torch.inverse.lissa.LissaOperator], the estimated smallest
            eigenvalue of the regularized curvature of the first batches.
    """

    smallest_eigenvalue: Optional[float] = None


def lissa(
    apply_batch: Callable[[TorchBatch, torch.Tensor], torch.Tensor],
    batches: Iterator[TorchBatch],
    rhs: torch.Tensor,
    regularization: Optional[float] = None,
    maxiter: int = 1000,
    dampen: float = 0.0,
    scale: float = 10.0,
    rtol: float = 1e-4,
    progress: bool = False,
) -> IterativeSolution:
    r"""LiSSA: a stochastic fixed-point iteration for $x = (A + \lambda I)^{-1} b$.

    With one mini-batch $b_t$ per step (its curvature $A_{b_t}$ an unbiased estimate of $A$),
    a dampening $d$ and a scale $s$:

    $$
    h_0 = b, \qquad
    h_{t+1} = b + (1 - d)\, h_t - \frac{(A_{b_t} + \lambda I)\, h_t}{s}, \qquad
    x \approx \frac{h_T}{s} .
    $$

    With $d = 0$ this is the truncated Neumann series of $s (A + \lambda I)^{-1}$; it
    converges when every eigenvalue $\mu$ of $A_{b_t} + \lambda I$ satisfies
    $0 < \mu < 2s$. A right-hand side stops once its relative change
    $\|h_{t+1} - h_t\| / \|h_{t+1}\|$ falls below `rtol`.

    The iteration is declared divergent (and a
    [LissaDivergenceError][influx.torch.inverse.lissa.LissaDivergenceError] raised) when $h$
    becomes NaN or Inf, or when $\|h_t\| > 10\,(t+1)\,\|b\|$: as long as every step is a
    contraction or an isometry, $\|h_t\| \le (t+1)\|b\|$, so growth beyond that bound means
    that the scale is too small for the curvature.

    Args:
        apply_batch: $(b, V) \mapsto V A_b^\top$ for a batch and rows `V` `(K, P)`.
        batches: an endless iterator of batches.
        rhs: the right-hand sides, one per row, `(N, P)`.
        regularization: $\lambda \ge 0$, or None.
        maxiter: maximum number of iterations (batches).
        dampen: the dampening $d \in [0, 1)$.
        scale: the scale $s > 0$.
        rtol: tolerance on the relative change, $> 0$.
        progress: show a progress bar over the iterations.

    Returns:
        The solutions; `residuals` holds the last relative change of each right-hand side.

    Raises:
        LissaDivergenceError: if the iteration diverges.
    """
    check_rows(rhs, "rhs")
    validate_regularization(regularization)
    validate_lissa_settings(maxiter, dampen, scale, rtol)
    lam = regularization or 0.0
    n = rhs.shape[0]
    h = rhs.clone()
    b_norm = torch.linalg.norm(rhs, dim=1)
    change = torch.zeros(n, dtype=rhs.dtype, device=rhs.device)
    iterations = torch.zeros(n, dtype=torch.long, device=rhs.device)
    converged = b_norm == 0
    active = torch.nonzero(~converged).squeeze(1)

    for it in tqdm(range(1, maxiter + 1), desc="LiSSA", disable=not progress, leave=False):
        if active.numel() == 0:
            break
        batch = next(batches)
        h_a = h[active]
        b_a = rhs[active]
        curvature = apply_batch(batch, h_a) + lam * h_a
        h_new = b_a + (1.0 - dampen) * h_a - curvature / scale
        new_norm = torch.linalg.norm(h_new, dim=1)
        if not bool(torch.isfinite(new_norm).all()) or bool(
            (new_norm > 10.0 * (it + 1) * b_norm[active]).any()
        ):
            raise LissaDivergenceError(
                f"LiSSA diverged at iteration {it} with scale={scale:.4g}: the norm of the "
                f"iterate grew to {float(new_norm.max()):.3g} (right-hand side norm "
                f"{float(b_norm[active].max()):.3g}). Increase 'scale' so that it exceeds "
                "half the largest eigenvalue of the regularized curvature of every batch (which "
                "must also be positive definite)."
            )
        rel = torch.linalg.norm(h_new - h_a, dim=1) / torch.clamp(
            new_norm, min=torch.finfo(rhs.dtype).tiny
        )
        h[active] = h_new
        change[active] = rel
        iterations[active] = it
        done = rel < rtol
        converged[active[done]] = True
        active = active[~done]

    return IterativeSolution(h / scale, iterations, change, converged)


class LissaOperator(TensorOperator):
    r"""Applies $(A + \lambda I)^{-1}$ approximately by LiSSA, one mini-batch per iteration.

    Starting from $h_0 = b$, with the curvature $A_{b_t}$ of the $t$-th mini-batch (the data
    loader is iterated again and again, in its own order; every application starts a fresh
    pass, so the operator holds no iteration state and repeated applications agree):

    $$
    h_{t+1} = b + (1 - d)\, h_t - \frac{(A_{b_t} + \lambda I)\, h_t}{s}, \qquad
    (A + \lambda I)^{-1} b \approx \frac{h_T}{s},
    $$

    with dampening $d$ and scale $s$ (see [lissa][influx.torch.inverse.lissa.lissa]). The scale
    must exceed half the largest eigenvalue of $A_b + \lambda I$ for every batch, or the
    iteration diverges (a `ValueError` asking to increase `scale`); larger scales converge
    more slowly. With `scale="auto"`, the largest eigenvalue $\mu_{\max}$ of $A_b$ is
    estimated by block power iteration on the first 3 batches, and
    $s = 1.5\,(\mu_{\max} + \lambda)$, which keeps the iteration stable for batches whose
    largest eigenvalue is up to three times the estimate. The estimate is computed once, at
    construction, and reused by `with_regularization`.

    A right-hand side stops when its relative change falls below `rtol`; `diagnostics` report
    method `"lissa"`, the iterations, the largest last relative change as `residual`, and the
    scale used.

    Args:
        batch_operation: the curvature of one batch, e.g. a
            [HessianBatchOperation][influx.torch.curvature.batch_operation.HessianBatchOperation].
        data: the training data, an iterable of `(x, y)` batches (its sampler and collate
            function are respected).
        regularization: $\lambda \ge 0$, or None.
        maxiter: maximum number of iterations (batches).
        dampen: the dampening $d \in [0, 1)$.
        scale: the scale $s > 0$, or `"auto"`.
        rtol: tolerance on the relative change between iterations, $> 0$.
        progress: show a progress bar over the iterations.
        warn_on_max_iteration: log a warning with the achieved relative change when `rtol` is
            not reached within `maxiter` iterations; if False, log it at debug level.
        on_nonconvergence: `"warn"` (log as above) or `"raise"` (raise a
            [NonConvergenceError][influx.errors.NonConvergenceError] with the diagnostics).
        seed: seed of the random start vectors of the eigenvalue estimates (`scale="auto"`
            and the divergence diagnosis); the same seed gives the same scale.
        block_name: named in the messages, if given (the block of an influence model).

    **Conditioning.** After the first application, 30 Lanczos steps on the mean curvature of
    the first 3 batches estimate its extreme eigenvalues $\mu_{\min} \le \mu_{\max}$ (once per
    operator, reused for every $\lambda$; `spectrum_estimate`). If
    $(\mu_{\max} + \lambda) / (\mu_{\min} + \lambda)$ exceeds what the dtype resolves (see
    [influx.torch.curvature.conditioning][influx.torch.curvature.conditioning]), `diagnostics`
    say `converged=False` and the message naming $\lambda$ and the smallest safe value is
    logged or raised per `on_nonconvergence`, whatever the relative change achieved. The
    estimate is that of the first batches, not of the whole data: with fewer points in them
    than parameters their Gauss-Newton matrix is singular, so $\lambda = 0$ is then always
    reported.

    When the iteration diverges, a few Lanczos steps estimate the smallest eigenvalue of the
    regularized curvature of the first batches: if it is negative, the
    [LissaDivergenceError][influx.torch.inverse.lissa.LissaDivergenceError] names negative
    curvature as the cause and the regularization that would make it positive; otherwise it
    asks for a larger scale.
    """

    largest_eigenvalue: Optional[float]

    def _reference(self) -> Any:
        return self.batch_operation

    def __init__(
        self,
        batch_operation: BatchOperation,
        data: DataLoader,
        regularization: Optional[float] = None,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: Union[float, str] = 10.0,
        rtol: float = 1e-4,
        progress: bool = False,
        warn_on_max_iteration: bool = True,
        on_nonconvergence: str = "warn",
        seed: Optional[int] = None,
        block_name: Optional[str] = None,
    ):
        self.block_name = block_name
        self._init(
            batch_operation,
            data,
            regularization,
            maxiter,
            dampen,
            scale,
            rtol,
            progress,
            warn_on_max_iteration,
            on_nonconvergence,
            seed,
        )
        if self.auto_scale:
            self.largest_eigenvalue = self._estimate_largest_eigenvalue()

    def _init(
        self,
        batch_operation: BatchOperation,
        data: DataLoader,
        regularization: Optional[float],
        maxiter: int,
        dampen: float,
        scale: Union[float, str],
        rtol: float,
        progress: bool,
        warn_on_max_iteration: bool,
        on_nonconvergence: str = "warn",
        seed: Optional[int] = None,
    ) -> None:
        if not isinstance(batch_operation, BatchOperation):
            raise TypeError(
                "Parameter 'batch_operation' must be a BatchOperation, got "
                f"{type(batch_operation).__name__}."
            )
        validate_regularization(regularization)
        validate_lissa_settings(maxiter, dampen, scale, rtol)
        check_seed(seed)
        self.on_nonconvergence = check_nonconvergence_policy(on_nonconvergence)
        self.seed = seed
        self.batch_operation = batch_operation
        self.data = data
        self._regularization = regularization
        self.maxiter = maxiter
        self.dampen = dampen
        self.rtol = rtol
        self.progress = progress
        self.warn_on_max_iteration = warn_on_max_iteration
        self.auto_scale = scale == "auto"
        self.largest_eigenvalue = None
        """With `scale="auto"`: the estimated largest eigenvalue of the batch curvature."""
        self.diagnostics = None
        self._scale_value = float(scale) if not self.auto_scale else 0.0
        self._spectrum: Optional[Tuple[float, float]] = None

    @property
    def scale(self) -> float:
        """The scale $s$ in use (computed from the eigenvalue estimate for `scale="auto"`)."""
        if self.auto_scale:
            assert self.largest_eigenvalue is not None
            return AUTO_SCALE_FACTOR * (self.largest_eigenvalue + (self._regularization or 0.0))
        return self._scale_value

    def _estimate_largest_eigenvalue(self) -> float:
        estimates = []
        generator = make_generator(self.seed, self.device)
        for index, batch in enumerate(iterate_batches(self.data, self.device)):
            if index >= AUTO_SCALE_BATCHES:
                break
            estimates.append(
                estimate_largest_eigenvalue(
                    functools.partial(self.batch_operation.apply, batch),
                    self.input_size,
                    self.dtype,
                    self.device,
                    generator=generator,
                )
            )
        if not estimates:
            raise ValueError("Parameter 'data' yielded no batches.")
        value = max(estimates)
        if value == 0.0:
            raise ValueError(
                "Parameter 'scale': 'auto' found a zero curvature on the first batches; pass a "
                "positive number instead."
            )
        logger.debug("LiSSA: estimated largest batch eigenvalue %.4g.", value)
        return value

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.dtype)
        # A fresh pass over the data per application: the operator keeps no iteration state,
        # so it can be pickled or used from several threads at any time.
        scale = self.scale
        try:
            result = lissa(
                self.batch_operation.apply,
                endless_batches(self.data, self.device),
                tensor,
                regularization=self._regularization,
                maxiter=self.maxiter,
                dampen=self.dampen,
                scale=scale,
                rtol=self.rtol,
                progress=self.progress,
            )
        except LissaDivergenceError as error:
            raise self._diagnose_divergence(error, scale) from error
        self.diagnostics = diagnostics_of(
            "lissa",
            result,
            rtol=self.rtol,
            maxiter=self.maxiter,
            scale=scale,
            dampen=self.dampen,
            residual_kind="relative change",
        )
        report_non_convergence(
            "LiSSA",
            result,
            self.warn_on_max_iteration,
            "relative change",
            f"Tolerance rtol={self.rtol:g}, maxiter={self.maxiter}, scale={scale:.4g}; "
            "increase 'maxiter' or the batch size.",
            self.on_nonconvergence,
            self.diagnostics,
        )
        self._check_conditioning()
        return result.solution

    def spectrum_estimate(self, steps: int = 30) -> Tuple[float, float]:
        r"""Estimates `(smallest, largest)` of the eigenvalues of the mean curvature of the
        first batches, without $\lambda$ (`steps` Lanczos steps, see
        [lanczos_extreme_eigenvalues][influx.torch.inverse.spectrum.lanczos_extreme_eigenvalues]);
        computed once per operator."""
        if self._spectrum is None:
            batches = list(islice(iterate_batches(self.data, self.device), AUTO_SCALE_BATCHES))
            total = sum(len(batch) for batch in batches)

            def mean_curvature(v: torch.Tensor) -> torch.Tensor:
                return sum(  # type: ignore[return-value]
                    self.batch_operation.apply(batch, v) * (len(batch) / total) for batch in batches
                )

            self._spectrum = lanczos_extreme_eigenvalues(
                mean_curvature, self.input_size, self.dtype, self.device, steps=steps,
                generator=make_generator(self.seed, self.device),
            )  # fmt: skip
        return self._spectrum

    def _check_conditioning(self) -> None:
        """Complete `diagnostics` with the condition number of the regularized mean curvature
        of the first batches, and report it per the policy if the dtype cannot resolve it."""
        assert self.diagnostics is not None
        lam = self._regularization or 0.0
        smallest, largest = self.spectrum_estimate()
        self.diagnostics.details["spectrum_estimate"] = [smallest, largest]
        self.diagnostics.regularization = self._regularization
        check_eigenvalue_conditioning(
            "LiSSA", torch.tensor([smallest + lam, largest + lam], dtype=torch.float64),
            self._regularization, self.dtype, self.on_nonconvergence, self.diagnostics,
            warn=self.warn_on_max_iteration, where=block_prefix(getattr(self, "block_name", None)),
        )  # fmt: skip

    def smallest_eigenvalue(self, steps: int = 30) -> float:
        r"""An estimate of the smallest eigenvalue of $A_b + \lambda I$ over the first batches
        $b$ (a few Lanczos steps per batch, see
        [lanczos_extreme_eigenvalues][influx.torch.inverse.spectrum.lanczos_extreme_eigenvalues])."""
        lam = self._regularization or 0.0
        generator = make_generator(self.seed, self.device)
        estimates = []
        for index, batch in enumerate(iterate_batches(self.data, self.device)):
            if index >= AUTO_SCALE_BATCHES:
                break
            smallest, _ = lanczos_extreme_eigenvalues(
                functools.partial(self.batch_operation.apply, batch),
                self.input_size,
                self.dtype,
                self.device,
                steps=steps,
                generator=generator,
            )
            estimates.append(smallest + lam)
        return min(estimates) if estimates else float("nan")

    def _diagnose_divergence(
        self, error: LissaDivergenceError, scale: float
    ) -> LissaDivergenceError:
        lam = self._regularization or 0.0
        smallest = self.smallest_eigenvalue()
        if smallest < 0:
            message = (
                f"{error} Cause: the regularized curvature has negative eigenvalues (smallest "
                f"about {smallest:.3g} on the first {AUTO_SCALE_BATCHES} batches with "
                f"regularization={lam:g}), so no scale makes LiSSA converge. Use "
                "second_order_mode=SecondOrderMode.GAUSS_NEWTON (positive semi-definite), or a "
                f"regularization larger than {lam - smallest:.3g}."
            )
        elif self.auto_scale:
            message = (
                f"{error} The regularized curvature of the first batches is positive (smallest "
                f"eigenvalue about {smallest:.3g}), but scale='auto' ({scale:.4g}, from the "
                f"first {AUTO_SCALE_BATCHES} batches) is too small for later batches: pass a "
                f"larger scale explicitly, e.g. scale={4 * scale:.3g}."
            )
        else:
            message = (
                f"{error} The regularized curvature of the first batches is positive (smallest "
                f"eigenvalue about {smallest:.3g}): Increase 'scale' above half the largest "
                "eigenvalue of every batch's curvature, or use scale='auto'."
            )
        diagnosed = LissaDivergenceError(message)
        diagnosed.smallest_eigenvalue = smallest
        return diagnosed

    def _regularization_changed(self) -> None:
        # An automatic scale is recomputed from the stored eigenvalue estimate.
        self.diagnostics = None

    def export_state(self) -> OperatorState:
        return OperatorState(
            "LissaOperator",
            tensors={},
            settings={
                "regularization": self._regularization,
                "maxiter": self.maxiter,
                "dampen": self.dampen,
                "scale": "auto" if self.auto_scale else self._scale_value,
                "rtol": self.rtol,
                "progress": self.progress,
                "warn_on_max_iteration": self.warn_on_max_iteration,
                "on_nonconvergence": self.on_nonconvergence,
                "seed": self.seed,
                "largest_eigenvalue": self.largest_eigenvalue,
            },
            children={"batch_operation": self.batch_operation.export_state()},
        )

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "LissaOperator":
        settings = dict(state.settings)
        largest = settings.pop("largest_eigenvalue")
        regularization = settings.pop("regularization")
        new = cls.__new__(cls)
        new._init(
            restore_operator(state.children["batch_operation"], context),
            context.require_data("LissaOperator"),  # type: ignore[arg-type]
            regularization,
            **settings,
        )
        new.largest_eigenvalue = largest
        return new
