r"""How much a projection distorts influence: an estimate from a few exact training gradients.

A random projection $P$ `(k, p)` replaces every inner product $\langle g, g' \rangle$ of
gradients by $\langle P g, P g' \rangle$, with an error of the order of
$\lVert g \rVert \lVert g' \rVert / \sqrt{k}$. Influence lives on what remains of the gradients
once the directions of the curvature are taken out (the inverse weights those remains by
$1/\lambda$), which is small next to $\lVert g \rVert$: this is where a projection too small for
the model loses the ranking.

**The estimate.** Take the exact per-sample training gradients of $m$ points of the fit data
(default 32), split into a curvature half $C$ ($m_c$ points) and a probe half $T$. With the Gram matrix $K = G G^\top$ of the $m$ gradients, the influence
among the probe points of the model whose curvature is the empirical Fisher of $C$,
$\frac{1}{m_c} G_C^\top G_C + \lambda I$, is by the Woodbury identity

$$
I_{TT} = \frac{1}{\lambda} \Big( K_{TT} - K_{TC} \big( K_{CC} + m_c \lambda I \big)^{-1}
K_{CT} \Big)
$$

(the pseudo-inverse at $\lambda = 0$, where only the bracket is compared). The same formula
with the Gram matrix $\tilde K = (G P^\top)(P G^\top)$ of the projected gradients gives the
projected model's $\tilde I_{TT}$. The distortion is the relative error of the probe points'
influences on one another (the diagonal, self-influence, is left out: it is the easy part),
pooled over the two ways of splitting (each half the curvature of the other),

$$
\delta = \left( \frac{\sum_{\text{splits}} \lVert \operatorname{off}(\tilde I_{TT} -
I_{TT}) \rVert_F^2}{\sum_{\text{splits}} \lVert \operatorname{off}(I_{TT}) \rVert_F^2}
\right)^{1/2} .
$$

It costs $m$ explicit per-sample gradients ($m p$ numbers, at most
`DISTORTION_GRADIENT_NUMBERS` $= 2^{28}$, 1 GB in float32: 23 points for 11.2 M parameters,
never fewer than 8) and $m^2 p$ multiply-adds, once per fit. It is exactly 0 for a
projection with $P^\top P = I$ (square orthogonal) and grows as $1/\sqrt{k}$ falls behind the
gradients' effective dimension. It measures the projection on a curvature of $m_c$ points only:
a real fit takes out more directions, leaving smaller remains, so the estimate errs on the
optimistic side.

**Reading it.** Above [DISTORTION_THRESHOLD][influx.torch.projection.distortion.DISTORTION_THRESHOLD]
the ranking of training points is unreliable. Since the error falls as $1/\sqrt{k}$, the
dimension that brings the estimate to half the threshold is about
$k \, (2 \delta / \delta_{max})^2$ (capped at $p$, where an orthogonal projection is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..data.batches import TorchBatch
from ..gradients.provider import TorchGradientProvider
from .gradients import SAMPLE_CHUNK_ELEMENTS, ProjectedGradientProvider

__all__ = [
    "DISTORTION_GRADIENT_NUMBERS",
    "DISTORTION_THRESHOLD",
    "MIN_SAMPLES",
    "DistortionEstimate",
    "distortion_from_gradients",
    "estimate_distortion",
    "probe_influences",
]

DISTORTION_THRESHOLD = 0.5
"""Above this relative error of the probe influences, rankings are called unreliable. On the
digits CNN of `benchmarks/bench_projected.py` (105 k parameters, Kronecker projection) the
estimate was 0.84-1.09 at $k = 64$, where the Pearson correlation with the exact influence was
0.81-0.89, and 0.11-0.36 at $k$ = 256 and 1024, where it was 0.96-0.99."""


DISTORTION_GRADIENT_NUMBERS = 2**28
"""Budget (numbers) of the exact gradients held for the estimate: 1 GB in float32."""

MIN_SAMPLES = 8
"""The estimate uses at least this many points (if the data has them), whatever the budget."""


@dataclass(frozen=True)
class DistortionEstimate:
    """The distortion estimate of one block's projection.

    Attributes:
        distortion: $\\delta$, the relative error of the probe influences.
        projection_dim: the projected dimension $k$ of the block.
        n_parameters: $p$, the block's number of parameters.
        samples: $m$, the number of gradients used.
        suggested_dim: the $k$ that should bring $\\delta$ to half the threshold (this $k$ if
            it is already below; at most $p$).
    """

    distortion: float
    projection_dim: int
    n_parameters: int
    samples: int
    suggested_dim: int

    @property
    def reliable(self) -> bool:
        """Whether $\\delta$ is at most the threshold."""
        return self.distortion <= DISTORTION_THRESHOLD


def probe_influences(gram: torch.Tensor, n_curvature: int, regularization: float) -> torch.Tensor:
    r"""$\lambda I_{TT} = K_{TT} - K_{TC}(K_{CC} + m_c \lambda I)^{-1} K_{CT}$ from the Gram matrix
    `(m, m)` of $m$ gradients whose first `n_curvature` form the curvature (float64)."""
    gram = gram.to(torch.float64)
    c = slice(0, n_curvature)
    t = slice(n_curvature, gram.shape[0])
    shifted = gram[c, c] + n_curvature * regularization * torch.eye(n_curvature, dtype=gram.dtype)
    solved = torch.linalg.pinv(shifted, hermitian=True) @ gram[c, t]
    return gram[t, t] - gram[t, c] @ solved  # type: ignore[no-any-return]


def _off_diagonal_errors(
    exact_gram: torch.Tensor, projected_gram: torch.Tensor, curvature: torch.Tensor, lam: float
) -> "tuple[float, float]":
    """Squared norms of the probe influences' off-diagonal errors and of their reference, the
    points of `curvature` (a boolean mask) forming the curvature and the others the probe."""
    order = torch.cat([torch.nonzero(curvature).flatten(), torch.nonzero(~curvature).flatten()])
    n_curvature = int(curvature.sum())
    reference = probe_influences(exact_gram[order][:, order], n_curvature, lam)
    estimate = probe_influences(projected_gram[order][:, order], n_curvature, lam)
    off = ~torch.eye(reference.shape[0], dtype=torch.bool)
    error = float(((estimate - reference)[off] ** 2).sum())
    return error, float((reference[off] ** 2).sum())


def distortion_from_gradients(
    exact: torch.Tensor,
    projected: torch.Tensor,
    regularization: Optional[float],
    n_parameters: Optional[int] = None,
) -> DistortionEstimate:
    r"""The distortion estimate from $m$ exact gradients `(m, p)` and their projections `(m, k)`:
    both halves serve in turn as the curvature and as the probe, and their off-diagonal errors
    are pooled.

    Args:
        exact: the gradients $G$.
        projected: $G P^\top$.
        regularization: $\lambda$ (None or 0: the limit $\lambda \to 0$).
        n_parameters: $p$ (default: the width of `exact`).

    Raises:
        ValueError: for fewer than 4 gradients, or gradients of different counts.
    """
    m = exact.shape[0]
    if m < 4 or projected.shape[0] != m:
        raise ValueError(
            "Parameters 'exact' and 'projected' must hold the same number m >= 4 of gradients, "
            f"got {m} and {projected.shape[0]}."
        )
    lam = float(regularization or 0.0)
    exact64, projected64 = exact.to(torch.float64), projected.to(torch.float64)
    exact_gram, projected_gram = exact64 @ exact64.T, projected64 @ projected64.T
    first_half = torch.arange(m) < m // 2
    error, scale = 0.0, 0.0
    for curvature in (first_half, ~first_half):
        e, s = _off_diagonal_errors(exact_gram, projected_gram, curvature, lam)
        error, scale = error + e, scale + s
    distortion = math.sqrt(error / scale) if scale > 0 else (0.0 if error == 0 else math.inf)
    k, p = projected.shape[1], int(n_parameters or exact.shape[1])
    suggested = k
    if distortion > DISTORTION_THRESHOLD:
        grown = k * (2 * distortion / DISTORTION_THRESHOLD) ** 2 if math.isfinite(distortion) else p
        suggested = min(p, math.ceil(grown))
    return DistortionEstimate(distortion, k, p, m, suggested)


def estimate_distortion(
    provider: ProjectedGradientProvider,
    batches: Iterable[TorchBatch],
    regularization: Optional[float],
    samples: int,
) -> Optional[DistortionEstimate]:
    """The distortion estimate of a block's projection from the first `samples` training points
    of `batches` (exact per-sample gradients of the training loss, in sub-batches; fewer
    points if their gradients would exceed `DISTORTION_GRADIENT_NUMBERS` numbers, never fewer
    than `MIN_SAMPLES`).

    Returns:
        the estimate, or None if `batches` hold fewer than 4 points.
    """
    exact_provider = TorchGradientProvider(
        provider.model,
        provider.loss,
        provider.params,  # type: ignore[arg-type]
        provider.block_name,
    )
    size = max(1, provider.projection.size)
    samples = max(MIN_SAMPLES, min(samples, DISTORTION_GRADIENT_NUMBERS // size))
    step = max(1, SAMPLE_CHUNK_ELEMENTS // size)
    exact, projected, count = [], [], 0
    for batch in batches:
        batch = TorchBatch(batch.x, batch.y).rows(0, samples - count)
        for sub in batch.chunks(step):
            g = exact_provider.flat_grads(sub)
            exact.append(g)
            projected.append(provider.projection.project_flat(g))
        count += len(batch)
        if count >= samples:
            break
    if count < 4:
        return None
    return distortion_from_gradients(
        torch.cat(exact), torch.cat(projected), regularization, provider.projection.size
    )
