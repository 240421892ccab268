r"""Kronecker-factored curvature (K-FAC and EK-FAC) for `nn.Linear` and `nn.Conv2d` layers.

For a layer with weight $W \in \mathbb{R}^{m \times d}$ and optional bias $b$, write
$\tilde a = (a, 1)$ for the layer input with a 1 appended when the bias is trainable, and
$\delta = \partial \ell / \partial s$ for the gradient of the per-sample loss with respect to
the layer output $s = W a + b$. The per-sample gradient of $\tilde W = [W \mid b]$ is
$\sum_t \delta_t \tilde a_t^\top$, summed over the positions $t$ of a sequence or over the
spatial positions of a convolution (whose inputs are unfolded into patches). With the
row-major flattening of $\tilde W$ the layer's block of the Fisher matrix
$F = \frac{1}{n}\sum_i g_i g_i^\top$ is approximated by a Kronecker product (K-FAC):

$$
F \approx G \otimes A, \qquad
A = \frac{1}{\sum_i T_i}\sum_{i, t} \tilde a_{it} \tilde a_{it}^\top, \qquad
G = \frac{1}{n}\sum_{i, t} \delta_{it} \delta_{it}^\top ,
$$

exact for a single position ($T_i = 1$) when $\delta$ and $\tilde a$ are independent. With
the eigendecompositions $A = Q_A \Lambda_A Q_A^\top$ and $G = Q_G \Lambda_G Q_G^\top$ (computed
in float64) the approximation is $Q \,\mathrm{diag}(\lambda_G \otimes \lambda_A)\, Q^\top$
with $Q = Q_G \otimes Q_A$. EK-FAC (George et al., 2018) keeps the eigenbasis $Q$ but refits
the eigenvalues to the data with a second pass,

$$
s_{jk} = \frac{1}{n}\sum_i \left(Q_G^\top \Big(\sum_t \delta_{it} \tilde a_{it}^\top\Big)
Q_A\right)_{jk}^2 ,
$$

the diagonal of $Q^\top F Q$: the best approximation of $F$ in Frobenius norm among the
matrices diagonal in the basis $Q$, hence never farther from $F$ than K-FAC.

The inverse $(Q\,\mathrm{diag}(s)\,Q^\top + \lambda I)^{-1}$ is applied to a gradient
$V = \tilde W$-shaped matrix without ever forming a $P \times P$ matrix:
$Q_G \big[(Q_G^\top V Q_A) \oslash (s + \lambda)\big] Q_A^\top$
(see [KroneckerFactoredOperator][influx.torch.kfac.operators.KroneckerFactoredOperator]).

**Which Fisher.** The gradient signal $\delta$ comes from the model's loss. With
`fisher="empirical"` (the default) the training labels are used: the factors approximate the
*empirical Fisher* $\frac{1}{n}\sum_i \nabla_\theta \ell_i \nabla_\theta \ell_i^\top$, which
is the Gauss-Newton matrix of
[SecondOrderMode.GAUSS_NEWTON][influx.torch.curvature.operators.SecondOrderMode]. With
`fisher="sampled"` (cross-entropy only) the labels are drawn from the model's predictive
distribution $\mathrm{softmax}(f_\theta(x))$, one draw per point and pass: the factors then
approximate the *true Fisher*, in expectation equal to the generalised Gauss-Newton matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import torch

from ..autodiff.derivatives import LossOrTask
from ..autodiff.model_call import call_model, is_task, model_outputs
from ..data.batches import TorchBatch, iterate_batches
from .contraction import rotated_gradients
from .layers import (
    ROOT_LAYER_NAME,
    SUPPORTED_LAYERS,
    LayerSpec,
    NotImplementedLayerRepresentationException,
    find_layers,
    layers_for_parameters,
)
from .signals import SignalRecorder

__all__ = [
    "FISHER_TYPES",
    "KroneckerEigenbasis",
    "KroneckerFactors",
    "LayerSpec",
    "SignalCache",
    "NotImplementedLayerRepresentationException",
    "collect_kronecker_factors",
    "eigendecompose_factors",
    "find_layers",
    "fit_kronecker_curvature",
    "layers_for_parameters",
    "ROOT_LAYER_NAME",
    "SUPPORTED_LAYERS",
    "layer_signals",
    "refit_eigenvalues",
    "validate_fisher",
]

logger = logging.getLogger(__name__)

FISHER_TYPES = ("empirical", "sampled")
"""The values of the `fisher` option: training labels, or labels sampled from the model."""


def validate_fisher(fisher: str, loss: LossOrTask) -> str:
    """Check the `fisher` option against the loss and return it.

    Raises:
        ValueError: for an unknown value, or `"sampled"` with a loss that is not cross-entropy.
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"Parameter 'fisher' must be one of {list(FISHER_TYPES)}, got {fisher!r}.")
    if fisher == "sampled" and not _is_cross_entropy(loss):
        raise ValueError(
            "Parameter 'fisher': 'sampled' draws class labels from the softmax of the model's "
            "outputs and needs the cross-entropy loss, got loss "
            f"{getattr(loss, '__name__', type(loss).__name__)!r}."
        )
    return fisher


def _is_cross_entropy(loss: LossOrTask) -> bool:
    return loss is torch.nn.functional.cross_entropy or isinstance(loss, torch.nn.CrossEntropyLoss)


def _sample_labels(outputs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Class labels drawn from $\\mathrm{softmax}$ over dimension 1 of `outputs`."""
    logits = outputs.detach()
    if logits.ndim == 1:
        logits = logits.unsqueeze(0)
    moved = logits.movedim(1, -1)
    probs = torch.softmax(moved.reshape(-1, moved.shape[-1]), dim=-1)
    labels = torch.multinomial(probs, 1, generator=generator)
    return labels.reshape(moved.shape[:-1])


def layer_signals(
    model: torch.nn.Module,
    layers: "Dict[str, LayerSpec]",
    batch: TorchBatch,
    loss: LossOrTask,
    fisher: str = "empirical",
    generator: Optional[torch.Generator] = None,
) -> "Dict[str, Tuple[torch.Tensor, torch.Tensor]]":
    r"""One forward and backward pass: $(\tilde a, \delta)$ of every layer for one batch.

    Recorded by [SignalRecorder][influx.torch.kfac.signals.SignalRecorder] (the user's module
    gets no hooks), with the training labels (`fisher="empirical"`) or labels drawn from the
    model's predictions (`fisher="sampled"`).

    Returns:
        per layer name, $\tilde a$ `(N, T, input_factor_dim)` and $\delta$ `(N, T, out_dim)`,
        in the model's dtype.

    Raises:
        LayerRecordingError: (a ValueError) if a layer is not called by the forward pass, or
            on inputs whose first dimension does not index samples.
    """
    objective = None
    if fisher != "empirical" and not is_task(loss):

        def objective(f: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
            prediction = model_outputs(call_model(f, x))
            labels = _sample_labels(prediction, generator)
            return loss(prediction, labels)  # type: ignore[operator, no-any-return]

    return SignalRecorder(model, layers, loss, objective=objective).record(batch)


@dataclass
class KroneckerFactors:
    r"""The Kronecker factors of one layer, in float64.

    Attributes:
        input_covariance: $A$, `(k, k)` with $k$ the size of $\tilde a$.
        output_grad_covariance: $G$, `(m, m)`.
        n_samples: the number of samples $n$ they were averaged over.
    """

    input_covariance: torch.Tensor
    output_grad_covariance: torch.Tensor
    n_samples: int


def _batches(
    data: Iterable, device: torch.device, progress: bool, desc: str
) -> Iterator[TorchBatch]:
    return tqdm(  # type: ignore[no-any-return]
        iterate_batches(data, device), desc=desc, disable=not progress, leave=False
    )


LayerSignals = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


class SignalCache:
    r"""Keeps the $(\tilde a, \delta)$ of every batch of the first pass, up to a budget.

    If they fit in `max_bytes`, the EK-FAC refit reuses them instead of a second pass over
    the data (with the training labels, the same values: the signals do not depend on the
    eigenbasis; with sampled labels the refit needs fresh draws and no cache is used). Once the budget is
    exceeded the cache is emptied and stays empty.

    Args:
        max_bytes: the memory budget.
    """

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.batches: List[Tuple[int, LayerSignals]] = []
        self.n_bytes = 0
        self.overflowed = max_bytes <= 0

    def add(self, n_samples: int, signals: LayerSignals) -> None:
        if self.overflowed:
            return
        self.n_bytes += sum(t.numel() * t.element_size() for pair in signals.values() for t in pair)
        if self.n_bytes > self.max_bytes:
            logger.debug(
                "Signal cache over budget (%d bytes): a second pass is needed.", self.n_bytes
            )
            self.batches, self.overflowed = [], True
            return
        self.batches.append((n_samples, signals))

    @property
    def complete(self) -> bool:
        """Whether every batch of the pass is cached."""
        return not self.overflowed


def collect_kronecker_factors(
    model: torch.nn.Module,
    layers: "Dict[str, LayerSpec]",
    data: DataLoader,
    loss: LossOrTask,
    fisher: str = "empirical",
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    cache: Optional[SignalCache] = None,
) -> "Dict[str, KroneckerFactors]":
    r"""$A$ and $G$ of every layer in one pass over the data (see the module docstring).

    Batch contributions are computed in the model's dtype and accumulated in float64, so the
    result does not depend on the batch size beyond rounding.

    Args:
        cache: if given, the signals of every batch are offered to it (for the EK-FAC refit).
    """
    fisher = validate_fisher(fisher, loss)
    device = next(iter(layers.values())).device
    a_sum: Dict[str, torch.Tensor] = {}
    g_sum: Dict[str, torch.Tensor] = {}
    positions = dict.fromkeys(layers, 0)
    n = 0
    for batch in _batches(data, device, progress, "K-FAC factors"):
        signals = layer_signals(model, layers, batch, loss, fisher, generator)
        n += len(batch)
        if cache is not None:
            cache.add(len(batch), signals)
        for name, (a, d) in signals.items():
            a2 = a.reshape(-1, a.shape[-1])
            d2 = d.reshape(-1, d.shape[-1])
            a_term = (a2.T @ a2).to(torch.float64)
            g_term = (d2.T @ d2).to(torch.float64)
            a_sum[name] = a_term if name not in a_sum else a_sum[name] + a_term
            g_sum[name] = g_term if name not in g_sum else g_sum[name] + g_term
            positions[name] += a2.shape[0]
    if n == 0:
        raise ValueError("Parameter 'data' yielded no batches.")
    for name in layers:  # NaN and Inf propagate into the sums
        _check_finite_factor(a_sum[name], "inputs", name)
        _check_finite_factor(g_sum[name], "output gradients", name)
    return {
        name: KroneckerFactors(a_sum[name] / positions[name], g_sum[name] / n, n) for name in layers
    }


def _check_finite_factor(factor: torch.Tensor, what: str, layer: str) -> None:
    if not bool(torch.isfinite(factor).all()):
        raise ValueError(
            f"NaN or Inf in the {what} of layer {layer!r}: check the inputs, the loss and the "
            "model's parameters."
        )


@dataclass
class KroneckerEigenbasis:
    r"""Eigendecompositions $A = Q_A \Lambda_A Q_A^\top$, $G = Q_G \Lambda_G Q_G^\top$ (float64).

    Eigenvalues are clamped at zero (the factors are positive semi-definite; tiny negative
    values are rounding).
    """

    input_eigenvalues: torch.Tensor
    input_eigenvectors: torch.Tensor
    output_eigenvalues: torch.Tensor
    output_eigenvectors: torch.Tensor

    @property
    def kfac_eigenvalues(self) -> torch.Tensor:
        r"""$\lambda_G \lambda_A^\top$, `(m, k)`: the K-FAC eigenvalues in the basis $Q$."""
        return torch.outer(self.output_eigenvalues, self.input_eigenvalues)


def _eigh(matrix: torch.Tensor, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    symmetric = (matrix + matrix.T) / 2
    try:
        evals, evecs = torch.linalg.eigh(symmetric)
    except RuntimeError as error:  # pragma: no cover - LAPACK failure on ill-conditioned input
        raise ValueError(f"The eigendecomposition of {what} failed: {error}") from error
    return evals.clamp_min(0.0), evecs


def eigendecompose_factors(factors: KroneckerFactors, name: str = "") -> KroneckerEigenbasis:
    """The eigendecompositions of a layer's factors, in float64."""
    evals_a, evecs_a = _eigh(factors.input_covariance.to(torch.float64), f"A of layer {name!r}")
    evals_g, evecs_g = _eigh(
        factors.output_grad_covariance.to(torch.float64), f"G of layer {name!r}"
    )
    return KroneckerEigenbasis(evals_a, evecs_a, evals_g, evecs_g)


def _signals(
    model: torch.nn.Module,
    layers: "Dict[str, LayerSpec]",
    data: DataLoader,
    loss: LossOrTask,
    fisher: str,
    generator: Optional[torch.Generator],
    progress: bool,
    device: torch.device,
    cached: Optional[SignalCache],
) -> Iterator[Tuple[int, LayerSignals]]:
    if cached is not None:
        if not cached.complete:
            raise ValueError("Parameter 'cached' must hold the signals of every batch.")
        yield from cached.batches
        return
    for batch in _batches(data, device, progress, "EK-FAC eigenvalues"):
        yield len(batch), layer_signals(model, layers, batch, loss, fisher, generator)


def refit_eigenvalues(
    model: torch.nn.Module,
    layers: "Dict[str, LayerSpec]",
    bases: "Dict[str, KroneckerEigenbasis]",
    data: DataLoader,
    loss: LossOrTask,
    fisher: str = "empirical",
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    cached: Optional[SignalCache] = None,
) -> "Dict[str, torch.Tensor]":
    r"""The EK-FAC eigenvalues $s_{jk}$ of every layer in a second pass (module docstring).

    For layers with one position per sample the squares factorise,
    $s = \frac{1}{n}\sum_i (Q_G^\top \delta_i)^{\circ 2} \,((Q_A^\top \tilde a_i)^{\circ 2})^\top$,
    and no per-sample gradient is formed; otherwise the per-sample gradients of one batch of
    one layer are formed in the rotated basis.

    Args:
        cached: the complete signals of the first pass; if given, `data` is not iterated.

    Returns:
        per layer, the eigenvalues `(m, k)` in float64.
    """
    fisher = validate_fisher(fisher, loss)
    device = next(iter(layers.values())).device
    rotations = {name: (b.input_eigenvectors, b.output_eigenvectors) for name, b in bases.items()}
    cast: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    sums: Dict[str, torch.Tensor] = {}
    n = 0
    for n_batch, signals in _signals(
        model, layers, data, loss, fisher, generator, progress, device, cached
    ):
        n += n_batch
        for name, (a, d) in signals.items():
            if name not in cast:
                qa, qg = rotations[name]
                cast[name] = (qa.to(a.dtype), qg.to(a.dtype))
            qa, qg = cast[name]
            if a.shape[1] == 1:
                term = ((d[:, 0] @ qg) ** 2).T @ ((a[:, 0] @ qa) ** 2)
            else:
                term = (rotated_gradients(a, d, qa, qg) ** 2).sum(dim=0)
            term = term.to(torch.float64)
            sums[name] = term if name not in sums else sums[name] + term
    if n == 0:
        raise ValueError("Parameter 'data' yielded no batches.")
    for name in layers:
        _check_finite_factor(sums[name], "refitted eigenvalues", name)
    return {name: sums[name] / n for name in layers}


def fit_kronecker_curvature(
    model: torch.nn.Module,
    layers: "Dict[str, LayerSpec]",
    data: DataLoader,
    loss: LossOrTask,
    fisher: str = "empirical",
    update_diagonal: bool = True,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    max_cache_mb: float = 256.0,
) -> "Tuple[Dict[str, KroneckerFactors], Dict[str, KroneckerEigenbasis], Dict[str, torch.Tensor]]":
    r"""K-FAC or EK-FAC for the given layers: factors, their eigenbases and the eigenvalues.

    One pass collects the factors ([collect_kronecker_factors][influx.torch.kfac.factors.collect_kronecker_factors]),
    which are eigendecomposed in float64; with `update_diagonal` the eigenvalues are refitted
    ([refit_eigenvalues][influx.torch.kfac.factors.refit_eigenvalues]) from the signals of the first
    pass if they fit in `max_cache_mb` and the labels are the training labels, else with a
    second pass (with `fisher="sampled"` always, so that the refit sees fresh label draws,
    independent of those of the eigenbasis). Without it the eigenvalues are the K-FAC
    products $\lambda_G \lambda_A^\top$.

    Returns:
        per layer, the factors, the eigenbases and the eigenvalues `(m, k)` (float64).
    """
    # With sampled labels the refit draws new ones (a second pass): fitting the eigenbasis and
    # the eigenvalues to the same draws doubles their noise.
    cache = SignalCache(max_cache_mb * 2**20 if update_diagonal and fisher == "empirical" else 0)
    factors = collect_kronecker_factors(
        model, layers, data, loss, fisher, generator, progress, cache
    )
    bases = {name: eigendecompose_factors(f, name) for name, f in factors.items()}
    if update_diagonal:
        eigenvalues = refit_eigenvalues(
            model,
            layers,
            bases,
            data,
            loss,
            fisher,
            generator,
            progress,
            cached=cache if cache.complete else None,
        )
    else:
        eigenvalues = {name: b.kfac_eigenvalues for name, b in bases.items()}
    return factors, bases, eigenvalues
