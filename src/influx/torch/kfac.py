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
(see [KroneckerFactoredOperator][influx.torch.kfac.KroneckerFactoredOperator]).

**Which Fisher.** The gradient signal $\delta$ comes from the model's loss. With
`fisher="empirical"` (the default) the training labels are used: the factors approximate the
*empirical Fisher* $\frac{1}{n}\sum_i \nabla_\theta \ell_i \nabla_\theta \ell_i^\top$, which
is the Gauss-Newton matrix of
[SecondOrderMode.GAUSS_NEWTON][influx.torch.operator.SecondOrderMode]. With
`fisher="sampled"` (cross-entropy only) the labels are drawn from the model's predictive
distribution $\mathrm{softmax}(f_\theta(x))$, one draw per point and pass: the factors then
approximate the *true Fisher*, in expectation equal to the generalised Gauss-Newton matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..types import SolverDiagnostics
from .base import TensorDictOperator, TorchBatch
from .functional import LossFunction
from .operator import iterate_batches
from .util import validate_regularization

__all__ = [
    "FISHER_TYPES",
    "KroneckerEigenbasis",
    "KroneckerFactoredOperator",
    "KroneckerFactors",
    "LayerSpec",
    "SignalCache",
    "NotImplementedLayerRepresentationException",
    "collect_kronecker_factors",
    "eigendecompose_factors",
    "find_layers",
    "fit_kronecker_curvature",
    "layer_signals",
    "layers_for_parameters",
    "refit_eigenvalues",
    "validate_fisher",
]

logger = logging.getLogger(__name__)

FISHER_TYPES = ("empirical", "sampled")
"""The values of the `fisher` option: training labels, or labels sampled from the model."""

SUPPORTED_LAYERS: Tuple[type, ...] = (torch.nn.Linear, torch.nn.Conv2d)


class NotImplementedLayerRepresentationException(ValueError):
    """Raised for a trainable layer that has no Kronecker-factored representation.

    Only `torch.nn.Linear` and `torch.nn.Conv2d` (with `groups=1`) are supported. Freeze the
    layer's parameters (`requires_grad_(False)`) or restrict the model to supported layers
    (the `layers` argument of [EkfacInfluence][influx.torch.influence_function_model.EkfacInfluence])
    to leave it out.
    """

    def __init__(self, module_id: str, reason: Optional[str] = None):
        self.module_id = module_id
        detail = reason or (
            "only torch.nn.Linear and torch.nn.Conv2d have a Kronecker-factored representation"
        )
        super().__init__(
            f"Layer {module_id}: {detail}. Freeze its parameters (requires_grad_(False)) or "
            "restrict the model to supported layers with 'layers'."
        )


@dataclass(frozen=True)
class LayerSpec:
    r"""A supported layer and how its parameters map to the matrix $\tilde W = [W \mid b]$.

    Attributes:
        name: the module name in `model.named_modules()` (the block name).
        module: the layer.
        weight_name: the full parameter name of the weight if it is trainable, else None.
        bias_name: the full parameter name of the bias if it exists and is trainable, else None.
    """

    name: str
    module: torch.nn.Module
    weight_name: Optional[str]
    bias_name: Optional[str]

    @property
    def device(self) -> torch.device:
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return weight.device

    @property
    def out_dim(self) -> int:
        """$m$: output features (Linear) or output channels (Conv2d)."""
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return int(weight.shape[0])

    @property
    def in_dim(self) -> int:
        """$d$: the number of columns of the weight as a matrix (`in_channels * kh * kw` for
        a convolution)."""
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return int(weight[0].numel())

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        return tuple(weight.shape)

    @property
    def input_factor_dim(self) -> int:
        r"""The size of $\tilde a$: $d$ if the weight is trainable, plus one for a bias."""
        return (self.in_dim if self.weight_name else 0) + (1 if self.bias_name else 0)

    @property
    def parameter_names(self) -> List[str]:
        """The trainable parameters of the layer, in `named_parameters()` order."""
        return [n for n in (self.weight_name, self.bias_name) if n is not None]

    def expanded_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        r"""$\tilde a$ of every position, shape `(N, T, input_factor_dim)`."""
        n = inputs.shape[0]
        parts: List[torch.Tensor] = []
        if self.weight_name is not None:
            if isinstance(self.module, torch.nn.Conv2d):
                patches = _unfold_conv2d_input(self.module, inputs)
            else:
                patches = inputs.reshape(n, -1, self.in_dim)
            parts.append(patches)
            positions = patches.shape[1]
        else:
            positions = self._positions_of_input(inputs)
        if self.bias_name is not None:
            parts.append(inputs.new_ones(n, positions, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _positions_of_input(self, inputs: torch.Tensor) -> int:
        if isinstance(self.module, torch.nn.Conv2d):
            return int(_unfold_conv2d_input(self.module, inputs[:1]).shape[1])
        return int(inputs[0].numel() // self.in_dim)

    def output_gradients(self, grad_output: torch.Tensor) -> torch.Tensor:
        r"""$\delta$ of every position, shape `(N, T, out_dim)`."""
        n = grad_output.shape[0]
        if isinstance(self.module, torch.nn.Conv2d):
            return grad_output.reshape(n, self.out_dim, -1).transpose(1, 2)
        return grad_output.reshape(n, -1, self.out_dim)


def _unfold_conv2d_input(module: torch.nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """The input patches of a convolution, `(N, L, in_channels * kh * kw)`."""
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        inputs = torch.nn.functional.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    patches = torch.nn.functional.unfold(
        inputs,
        kernel_size=module.kernel_size,
        dilation=module.dilation,
        padding=padding,  # type: ignore[arg-type]
        stride=module.stride,
    )
    return patches.transpose(1, 2)


def _layer_spec(name: str, module: torch.nn.Module, block_name: str) -> Optional[LayerSpec]:
    """The spec of a layer with trainable direct parameters, None if it has none."""
    trainable = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not trainable:
        return None
    label = f"{block_name!r} ({type(module).__name__})"
    if not isinstance(module, SUPPORTED_LAYERS):
        raise NotImplementedLayerRepresentationException(label)
    if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
        raise NotImplementedLayerRepresentationException(
            label, f"grouped convolutions (groups={module.groups}) are not supported"
        )
    prefix = f"{name}." if name else ""
    names = {n for n, _ in trainable}
    return LayerSpec(
        name=block_name,
        module=module,
        weight_name=prefix + "weight" if "weight" in names else None,
        bias_name=prefix + "bias" if "bias" in names else None,
    )


ROOT_LAYER_NAME = "model"
"""The block name of a model that is itself a single layer (its module name is empty)."""


def find_layers(
    model: torch.nn.Module, layers: Optional[Sequence[str]] = None
) -> "Dict[str, LayerSpec]":
    """The layers with trainable parameters, by module name, in `named_modules()` order.

    Frozen parameters are ignored; a layer whose parameters are all frozen is left out.

    Args:
        model: the model.
        layers: the module names to use; None means every module with trainable parameters.

    Raises:
        NotImplementedLayerRepresentationException: for a selected layer with trainable
            parameters that is not a Linear or a (non-grouped) Conv2d.
        ValueError: for unknown names, selected layers without trainable parameters, or no
            layer at all.
    """
    modules = dict(model.named_modules())
    if layers is not None:
        if isinstance(layers, str):
            raise TypeError(
                f"Parameter 'layers' must be a sequence of module names, got the string {layers!r}."
            )
        unknown = [name for name in layers if name not in modules and name != ROOT_LAYER_NAME]
        if unknown:
            valid = [n or ROOT_LAYER_NAME for n, m in modules.items() if _has_trainable(m)]
            raise ValueError(
                f"Parameter 'layers' names unknown modules {unknown}; modules with trainable "
                f"parameters are {valid}."
            )
    result: Dict[str, LayerSpec] = {}
    for name, module in modules.items():
        block_name = name or ROOT_LAYER_NAME
        if layers is not None and block_name not in layers and name not in layers:
            continue
        spec = _layer_spec(name, module, block_name)
        if spec is None:
            if layers is not None:
                raise ValueError(
                    f"Parameter 'layers': module {block_name!r} has no trainable parameters of "
                    "its own."
                )
            continue
        result[block_name] = spec
    if not result:
        raise ValueError(
            "Parameter 'model' has no trainable Linear or Conv2d layer (requires_grad=True)."
        )
    return result


def layers_for_parameters(
    model: torch.nn.Module, parameter_names: Iterable[str]
) -> "Dict[str, LayerSpec]":
    """The supported layers holding some of the named parameters, in `named_modules()` order.

    A `Linear` or (non-grouped) `Conv2d` layer is included if its weight or its bias is among
    `parameter_names`; its spec covers exactly those of the two that are. Parameters of other
    modules are left out without error (the caller treats them otherwise).

    Args:
        model: the model.
        parameter_names: full parameter names, as in `model.named_parameters()`.

    Returns:
        the layer specs by block name (module name, or `"model"` for the model itself).
    """
    wanted = set(parameter_names)
    result: Dict[str, LayerSpec] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
            continue
        prefix = f"{name}." if name else ""
        weight = prefix + "weight" if prefix + "weight" in wanted else None
        bias = prefix + "bias" if module.bias is not None and prefix + "bias" in wanted else None
        if weight is None and bias is None:
            continue
        block_name = name or ROOT_LAYER_NAME
        result[block_name] = LayerSpec(block_name, module, weight, bias)
    return result


def _has_trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def validate_fisher(fisher: str, loss: LossFunction) -> str:
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


def _is_cross_entropy(loss: LossFunction) -> bool:
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
    loss: LossFunction,
    fisher: str = "empirical",
    generator: Optional[torch.Generator] = None,
) -> "Dict[str, Tuple[torch.Tensor, torch.Tensor]]":
    r"""One forward and backward pass: $(\tilde a, \delta)$ of every layer for one batch.

    Forward hooks record each layer's input and output; the gradients of the (mean) batch loss
    with respect to the outputs are taken with `torch.autograd.grad`, so the parameters'
    `.grad` are left untouched. They are scaled by the batch size $|b|$ to give the gradients
    of the per-sample losses. A layer called several times contributes its calls as further
    positions.

    Returns:
        per layer name, $\tilde a$ `(N, T, input_factor_dim)` and $\delta$ `(N, T, out_dim)`,
        in the model's dtype.
    """
    inputs: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}
    outputs: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}

    def make_hook(name: str) -> Callable[..., torch.Tensor]:
        def hook(module: torch.nn.Module, args: Tuple, output: torch.Tensor) -> torch.Tensor:
            inputs[name].append(args[0].detach())
            outputs[name].append(output)
            # Later in-place operations must not modify the tensor we differentiate against.
            return output.clone()

        return hook

    handles = [spec.module.register_forward_hook(make_hook(name)) for name, spec in layers.items()]
    try:
        with torch.enable_grad():
            prediction = model(batch.x)
            targets = batch.y if fisher == "empirical" else _sample_labels(prediction, generator)
            value = loss(prediction, targets)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if not outputs[name]]
    if missing:
        raise ValueError(
            f"Layers {missing} were not called by the model's forward pass (their parameters "
            "may be used through a functional call): restrict the model to the layers it calls."
        )
    flat_outputs = [o for name in layers for o in outputs[name]]
    if not value.requires_grad:
        raise ValueError("The loss does not depend on the layers' parameters (no gradient).")
    grads = torch.autograd.grad(value, flat_outputs, allow_unused=True)
    n = len(batch)
    result: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    position = 0
    for name, spec in layers.items():
        a_parts, d_parts = [], []
        for inp, out in zip(inputs[name], outputs[name]):
            g = grads[position]
            position += 1
            if inp.shape[0] != n:
                raise ValueError(
                    f"Layer {name!r} received an input with first dimension {inp.shape[0]}, "
                    f"expected the batch size {n}: the first dimension must index samples."
                )
            g = torch.zeros_like(out) if g is None else g * n
            a_parts.append(spec.expanded_inputs(inp))
            d_parts.append(spec.output_gradients(g.detach()))
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1)
        d = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, dim=1)
        result[name] = (a, d)
    return result


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
    the data (same values: the signals do not depend on the eigenbasis). Once the budget is
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
    loss: LossFunction,
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
    loss: LossFunction,
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
    loss: LossFunction,
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
            a_rot = a @ qa
            d_rot = d @ qg
            if a.shape[1] == 1:
                term = (d_rot[:, 0] ** 2).T @ (a_rot[:, 0] ** 2)
            else:
                term = (torch.einsum("ntm,ntk->nmk", d_rot, a_rot) ** 2).sum(dim=0)
            term = term.to(torch.float64)
            sums[name] = term if name not in sums else sums[name] + term
    if n == 0:
        raise ValueError("Parameter 'data' yielded no batches.")
    for name in layers:
        _check_finite_factor(sums[name], "refitted eigenvalues", name)
    return {name: sums[name] / n for name in layers}


class KroneckerFactoredOperator(TensorDictOperator):
    r"""$(Q\,\mathrm{diag}(s)\,Q^\top + \lambda I)^{-1}$ for $Q = Q_G \otimes Q_A$, one layer.

    Acts on the layer's flat gradients (weight flattened, then bias, the order of
    `named_parameters()`), which it lays out as the matrix $V = [W \mid b]$ `(m, k)`; the
    Kronecker structure is over the row-major flattening of $V$. Applying it costs two small
    matrix products on each side and never forms a $P \times P$ matrix:

    $$
    V \mapsto Q_G \left[ \left(Q_G^\top V Q_A\right) \oslash (s + \lambda) \right] Q_A^\top .
    $$

    For K-FAC $s = \lambda_G \lambda_A^\top$; for EK-FAC $s$ is refitted to the data.
    Entries with $s_{jk} + \lambda$ at rounding level are treated as zero curvature and get a
    zero inverse (a pseudo-inverse, with a warning), as for
    [DirectSolveOperator][influx.torch.operator.DirectSolveOperator].

    Args:
        input_eigenvectors: $Q_A$ `(k, k)`.
        output_eigenvectors: $Q_G$ `(m, m)`.
        eigenvalues: $s$ `(m, k)`, non-negative.
        regularization: $\lambda \ge 0$ or None.
        weight_name: the weight's parameter name, None if the weight is not part of the block.
        weight_shape: the weight's shape (`(m, d)` or `(m, c, kh, kw)`).
        bias_name: the bias's parameter name, None if the bias is not part of the block.
        method: `"ekfac"` or `"kfac"`, reported in `diagnostics`.
        dtype: the dtype of inputs and results (the eigenvectors are cast to it); default
            that of the eigenvectors.
        layer_name: the layer's name, for messages and diagnostics.
    """

    def __init__(
        self,
        input_eigenvectors: torch.Tensor,
        output_eigenvectors: torch.Tensor,
        eigenvalues: torch.Tensor,
        regularization: Optional[float],
        weight_name: Optional[str],
        weight_shape: Tuple[int, ...],
        bias_name: Optional[str] = None,
        method: str = "ekfac",
        dtype: Optional[torch.dtype] = None,
        layer_name: str = "",
    ):
        validate_regularization(regularization)
        k, m = input_eigenvectors.shape[0], output_eigenvectors.shape[0]
        if input_eigenvectors.shape != (k, k) or output_eigenvectors.shape != (m, m):
            raise ValueError(
                "Parameters 'input_eigenvectors' and 'output_eigenvectors' must be square, got "
                f"{tuple(input_eigenvectors.shape)} and {tuple(output_eigenvectors.shape)}."
            )
        if tuple(eigenvalues.shape) != (m, k):
            raise ValueError(
                f"Parameter 'eigenvalues' must have shape ({m}, {k}), got "
                f"{tuple(eigenvalues.shape)}."
            )
        if weight_name is None and bias_name is None:
            raise ValueError("Parameters 'weight_name' and 'bias_name' cannot both be None.")
        d = int(torch.Size(weight_shape[1:]).numel())
        expected_k = (d if weight_name is not None else 0) + (1 if bias_name is not None else 0)
        if weight_shape[0] != m or expected_k != k:
            raise ValueError(
                f"Parameter 'weight_shape' {tuple(weight_shape)} does not match factors of sizes "
                f"m={m}, k={k} (bias {'included' if bias_name else 'excluded'})."
            )
        self._regularization = regularization
        self.method = method
        self.layer_name = layer_name
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.weight_shape = tuple(weight_shape)
        self._dtype = dtype or input_eigenvectors.dtype
        self._device = input_eigenvectors.device
        self.eigenvalues = eigenvalues.to(torch.float64)
        self._input_eigenvectors = input_eigenvectors
        self._output_eigenvectors = output_eigenvectors
        self._qa = input_eigenvectors.to(self._dtype)
        self._qg = output_eigenvectors.to(self._dtype)
        self._m, self._k, self._d = m, k, d
        self._inverse = self._inverse_eigenvalues().to(self._dtype)
        self.diagnostics = SolverDiagnostics(
            method=method,
            converged=True,
            details={
                "layer": layer_name,
                "factor_shapes": ((k, k), (m, m)),
                "regularization": regularization,
                "min_eigenvalue": float(self.eigenvalues.min()),
                "max_eigenvalue": float(self.eigenvalues.max()),
                "n_zero_inverse": self._n_zero,
            },
        )

    def _inverse_eigenvalues(self) -> torch.Tensor:
        shifted = self.eigenvalues + (self._regularization or 0.0)
        tol = float(shifted.abs().max()) * shifted.numel() * torch.finfo(torch.float64).eps
        keep = shifted > tol
        self._n_zero = int((~keep).sum())
        if self._n_zero:
            logger.warning(
                "Layer %r: %d of %d Kronecker eigenvalues (plus regularization) are zero up to "
                "rounding; their inverse is set to zero (pseudo-inverse). Increase the "
                "regularization to make the curvature invertible.",
                self.layer_name,
                self._n_zero,
                shifted.numel(),
            )
        return torch.where(keep, 1.0 / torch.where(keep, shifted, 1.0), 0.0)

    @property
    def input_size(self) -> int:
        return self._m * self._k

    @property
    def input_dict_structure(self) -> Dict[str, Tuple[int, ...]]:
        structure: Dict[str, Tuple[int, ...]] = {}
        if self.weight_name is not None:
            structure[self.weight_name] = self.weight_shape
        if self.bias_name is not None:
            structure[self.bias_name] = (self._m,)
        return structure

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def input_eigenvectors(self) -> torch.Tensor:
        """$Q_A$, as given."""
        return self._input_eigenvectors

    @property
    def output_eigenvectors(self) -> torch.Tensor:
        """$Q_G$, as given."""
        return self._output_eigenvectors

    def _to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """Flat rows `(N, P)` to matrices $[W \\mid b]$ `(N, m, k)`."""
        n = tensor.shape[0]
        if self.weight_name is None or self.bias_name is None:
            return tensor.reshape(n, self._m, self._k)
        weight = tensor[:, : self._m * self._d].reshape(n, self._m, self._d)
        bias = tensor[:, self._m * self._d :].reshape(n, self._m, 1)
        return torch.cat([weight, bias], dim=2)

    def _to_flat(self, matrix: torch.Tensor) -> torch.Tensor:
        n = matrix.shape[0]
        if self.weight_name is None or self.bias_name is None:
            return matrix.reshape(n, -1)
        return torch.cat([matrix[:, :, : self._d].reshape(n, -1), matrix[:, :, self._d]], dim=1)

    def _scale_in_eigenbasis(self, matrix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rotated = self._qg.T @ matrix @ self._qa
        return self._qg @ (rotated * scale) @ self._qa.T

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        matrix = self._to_matrix(tensor.to(self._dtype))
        return self._to_flat(self._scale_in_eigenbasis(matrix, self._inverse))

    def _apply_to_dict(self, mat: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        n = next(iter(mat.values())).shape[0]
        parts = []
        if self.weight_name is not None:
            parts.append(mat[self.weight_name].to(self._dtype).reshape(n, self._m, self._d))
        if self.bias_name is not None:
            parts.append(mat[self.bias_name].to(self._dtype).reshape(n, self._m, 1))
        matrix = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        result = self._scale_in_eigenbasis(matrix, self._inverse)
        out: Dict[str, torch.Tensor] = {}
        if self.weight_name is not None:
            out[self.weight_name] = result[:, :, : self._d].reshape(n, *self.weight_shape)
        if self.bias_name is not None:
            out[self.bias_name] = result[:, :, -1]
        return out

    def curvature_matrix(self) -> torch.Tensor:
        r"""The dense curvature $Q\,\mathrm{diag}(s)\,Q^\top$ `(P, P)` in the flat parameter
        order, without regularization. For tests and small layers only."""
        eye = torch.eye(self.input_size, dtype=torch.float64, device=self._device)
        qa, qg = (
            self._input_eigenvectors.to(torch.float64),
            self._output_eigenvectors.to(torch.float64),
        )
        matrix = self._to_matrix(eye)
        rotated = qg.T @ matrix @ qa
        return self._to_flat(qg @ (rotated * self.eigenvalues) @ qa.T)

    def with_regularization(self, regularization: Optional[float]) -> "KroneckerFactoredOperator":
        """The same factors with another $\\lambda$ (nothing is recomputed but $1/(s+\\lambda)$)."""
        return KroneckerFactoredOperator(
            self._input_eigenvectors,
            self._output_eigenvectors,
            self.eigenvalues,
            regularization,
            self.weight_name,
            self.weight_shape,
            self.bias_name,
            method=self.method,
            dtype=self._dtype,
            layer_name=self.layer_name,
        )


def fit_kronecker_curvature(
    model: torch.nn.Module,
    layers: "Dict[str, LayerSpec]",
    data: DataLoader,
    loss: LossFunction,
    fisher: str = "empirical",
    update_diagonal: bool = True,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    max_cache_mb: float = 256.0,
) -> "Tuple[Dict[str, KroneckerFactors], Dict[str, KroneckerEigenbasis], Dict[str, torch.Tensor]]":
    r"""K-FAC or EK-FAC for the given layers: factors, their eigenbases and the eigenvalues.

    One pass collects the factors ([collect_kronecker_factors][influx.torch.kfac.collect_kronecker_factors]),
    which are eigendecomposed in float64; with `update_diagonal` the eigenvalues are refitted
    ([refit_eigenvalues][influx.torch.kfac.refit_eigenvalues]) from the signals of the first
    pass if they fit in `max_cache_mb`, else with a second pass. Without it the eigenvalues
    are the K-FAC products $\lambda_G \lambda_A^\top$.

    Returns:
        per layer, the factors, the eigenbases and the eigenvalues `(m, k)` (float64).
    """
    cache = SignalCache(max_cache_mb * 2**20 if update_diagonal else 0)
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
