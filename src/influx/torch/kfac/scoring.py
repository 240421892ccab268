r"""Scoring training points against Kronecker-factored layers without their per-sample gradients.

For a `Linear` or `Conv2d` layer the per-sample gradient of $\tilde W = [W \mid b]$ is
$\nabla_{\tilde W} \ell_j = \sum_t \delta_{jt} \tilde a_{jt}^\top$ (see
[influx.torch.kfac.factors][influx.torch.kfac.factors]), so the score of a test factor $V_i$ (the layer's part
of $(C + \lambda I)^{-1} \nabla_\theta \ell(z'_i)$ as a matrix `(m, k)`) against training
point $j$ is

$$
s_{ij} = \langle V_i, \nabla_{\tilde W} \ell_j \rangle
= \sum_t \delta_{jt}^\top V_i \tilde a_{jt} .
$$

One forward and one backward pass per chunk of training points give $\tilde a$ and $\delta$ of
every layer at once. Per layer, the score is then either a contraction of $V$ with $\tilde a$
and $\delta$ (never forming a per-sample gradient) or a product with the per-sample gradients
formed for the chunk, whichever [uses_contraction][influx.torch.kfac.contraction.uses_contraction]
finds cheaper; the chunk size bounds the memory by `chunk_bytes`, so the peak is
$O(\text{chunk} \times P_\text{layer})$ rather than $O(n \times P_\text{layer})$. The test
factors are formed the same way (one pass over the test batch, the per-sample gradients
$\sum_t \delta_t \tilde a_t^\top$ as matrices) and, for a Kronecker-factored operator, the
operator is applied to the matrices directly; summed influences accumulate the scores of all
layers in one matrix.

The layer inputs and output gradients are recorded by
[SignalRecorder][influx.torch.kfac.signals.SignalRecorder]: the user's module gets no hooks,
and several threads can score with one model at once.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Generator, Iterator, Optional, Sequence, Tuple, Union

import torch

from ...types import InfluenceMode, check_mode
from ..autodiff.derivatives import LossOrTask
from ..autodiff.model_call import is_task
from ..composition.block_mapper import TorchBlockMapper, TorchOperatorGradientComposition
from ..data.batches import TorchBatch
from ..data.validation import check_finite
from .contraction import layer_scores, uses_contraction
from .layers import LayerSpec, layers_for_parameters
from .operators import KroneckerFactoredCurvature
from .signals import SignalRecorder, Signals, UnscorableModelError

__all__ = [
    "KroneckerBlockMapper",
    "SCORE_CHUNK_BYTES",
    "layer_block_mapper",
]

logger = logging.getLogger(__name__)

SCORE_CHUNK_BYTES = 640 * 2**10
"""The default memory budget (bytes) of the working tensors of one chunk of training points."""

TEST_CHUNK_BYTES = 2**26
"""The largest per-sample gradients of one layer (bytes) turned into test factors at once."""

MIN_CHUNK = 8
"""The smallest chunk of training points, whatever the budget."""


def _check_finite(values: torch.Tensor, layer: str) -> None:
    """Raise a ValueError naming the layer if `values` has NaN or Inf; one reduction (their
    sum) when they are finite."""
    if not bool(torch.isfinite(values.sum())):
        check_finite(values, "per-sample gradients", layer)


class _ConvertedFactors:
    """The matrices by block of the last flat test factors, kept while those are alive and
    unchanged (scored against every training chunk, converted once); pickles start empty."""

    def __init__(self) -> None:
        self._slot: Optional[Tuple[Any, int, "OrderedDict[str, torch.Tensor]"]] = None

    def get(
        self, flat: torch.Tensor, convert: Callable[[], "OrderedDict[str, torch.Tensor]"]
    ) -> "OrderedDict[str, torch.Tensor]":
        slot = self._slot
        if slot is not None and slot[0]() is flat and slot[1] == flat._version:
            return slot[2]
        matrices = convert()

        def drop(ref: Any) -> None:  # the flat factors are gone: so are their matrices
            if self._slot is not None and self._slot[0] is ref:
                self._slot = None

        self._slot = (weakref.ref(flat, drop), flat._version, matrices)
        return matrices

    def __getstate__(self) -> Dict[str, Any]:
        return {"_slot": None}


class KroneckerBlockMapper(TorchBlockMapper):
    r"""Block mapper of a model whose blocks are `Linear` / `Conv2d` layers: the training side
    of `Up` influences and self-influences is computed from the layers' inputs and output
    gradients, chunk by chunk (see the module description), never from the per-sample
    gradients of the whole batch.

    Test factors come from one recorded pass over the test batch, applied in matrix form
    (for Kronecker-factored operators and a loss function; otherwise block by block as for any
    block). `Perturbation` influences are computed block by block from the mixed derivatives,
    in chunks of training points. A model whose layer calls cannot be recorded is scored block
    by block from per-sample gradients.

    Args:
        composable_block_dict: the blocks, named after their layers.
        model: the model (the one the blocks' gradients are taken of).
        loss: its training loss or task.
        layers: the layer of every block, by block name.
        chunk_bytes: the memory budget of the working tensors of one chunk of training points.
    """

    def __init__(
        self,
        composable_block_dict: "OrderedDict[str, TorchOperatorGradientComposition]",
        model: torch.nn.Module,
        loss: LossOrTask,
        layers: "Dict[str, LayerSpec]",
        chunk_bytes: int = SCORE_CHUNK_BYTES,
    ):
        super().__init__(composable_block_dict)
        if list(layers) != list(composable_block_dict):
            raise ValueError(
                f"Parameter 'layers' must name the blocks {list(composable_block_dict)}, got "
                f"{list(layers)}."
            )
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(
                f"Parameter 'chunk_bytes' must be a positive int, got {chunk_bytes!r}."
            )
        self.model = model
        self.loss = loss
        self.layers = layers
        self.chunk_bytes = chunk_bytes
        self._converted = _ConvertedFactors()

    def to(self, device: torch.device) -> "KroneckerBlockMapper":
        self._converted = _ConvertedFactors()
        super().to(device)
        return self

    def subset(self, names: Sequence[str]) -> "KroneckerBlockMapper":
        """The map over the layers `names` only, in this mapper's order."""
        blocks = self._blocks_named(names)
        layers = {name: self.layers[name] for name in blocks}
        return KroneckerBlockMapper(blocks, self.model, self.loss, layers, self.chunk_bytes)

    def _chunks(
        self, batch: TorchBatch, floor_bytes: int = 0
    ) -> Iterator[Tuple[int, int, Optional[Signals]]]:
        """`(start, stop, signals)` of consecutive chunks covering `batch`, each chunk's layer
        inputs and output gradients within the budget, `chunk_bytes` or `floor_bytes` if that
        is larger; signals None if the model's layer calls cannot be recorded (then no further
        chunk is yielded)."""
        budget = max(self.chunk_bytes, floor_bytes)
        n = len(batch)
        size = MIN_CHUNK  # the first chunk tells the number of positions of every layer
        start = 0
        try:
            recorder = SignalRecorder(self.model, self.layers, self.loss)
            while start < n:
                stop = min(n, start + size)
                signals = recorder.record(batch.rows(start, stop))
                yield start, stop, signals
                # the signals, and as much again for the activations of the backward pass
                per_sample = 2 * sum(a[0].numel() + d[0].numel() for a, d in signals.values())
                size = max(MIN_CHUNK, budget // (self._element_size * per_sample))
                start = stop
        except UnscorableModelError as error:
            logger.debug("Scoring from per-sample gradients: %s.", error)
            yield start, n, None

    @property
    def _dtype(self) -> torch.dtype:
        block = next(iter(self.composable_block_dict.values()))
        return block.gradient_provider.dtype

    @property
    def _element_size(self) -> int:
        return torch.empty((), dtype=self._dtype).element_size()

    def _parts(self, name: str, n_factors: int, a: torch.Tensor) -> Iterator[slice]:
        """Consecutive slices of the rows of `a` whose working tensors are within the budget:
        those of [layer_scores][influx.torch.kfac.contraction.layer_scores] for `n_factors` test
        factors, or with none (self-influence) the per-sample gradients and a few images of
        them under the operator. The budget is at least the size of the layer's test factors
        (held anyway), so that every pass over them scores enough training points to pay for
        reading them."""
        spec = self.layers[name]
        m, k, positions = spec.out_dim, spec.input_factor_dim, a.shape[1]
        if not n_factors:
            per_sample = 4 * m * k
        elif uses_contraction(n_factors, positions, m, k):
            per_sample = 2 * n_factors * positions * min(m, k)
        else:
            per_sample = m * k
        budget = max(self.chunk_bytes, n_factors * m * k * self._element_size)
        size = max(MIN_CHUNK, budget // (self._element_size * per_sample))
        for start in range(0, a.shape[0], size):
            yield slice(start, start + size)

    def _factor_matrices(
        self, factors: "OrderedDict[str, torch.Tensor]"
    ) -> "OrderedDict[str, torch.Tensor]":
        result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name, block in self.composable_block_dict.items():
            size = block.gradient_provider.input_size
            value = factors[name]
            if value.ndim != 2 or value.shape[1] != size:
                raise ValueError(
                    f"Parameter 'z_test_factors' must have shape (N, {size}) for block "
                    f"{name!r}, got {tuple(value.shape)}."
                )
            value = value.to(device=block.op.device, dtype=self._dtype)
            # contiguous: the products of `layer_scores` read them as one matrix
            result[name] = self.layers[name].matrix_from_flat(value).contiguous()
        return result

    def _left_matrices(
        self, left_factors: Union[torch.Tensor, "OrderedDict[str, torch.Tensor]"]
    ) -> "OrderedDict[str, torch.Tensor]":
        """The test factors as matrices by block (flat factors converted once while alive)."""
        if isinstance(left_factors, torch.Tensor):
            return self._converted.get(
                left_factors, lambda: self._factor_matrices(self._to_block_dict(left_factors))
            )
        return self._factor_matrices(self._to_block_dict(left_factors))

    def _lean_factors(
        self, batch: TorchBatch, flat: bool
    ) -> "Optional[OrderedDict[str, torch.Tensor]]":
        r"""The factors $A_b \nabla_{\theta_b} \ell(z'_i)$ of a test batch by block, as
        matrices `(N, m, k)` or (`flat`) rows `(N, P_b)`, from the layers' inputs and output
        gradients of one forward and backward pass, applied in matrix form a chunk of test
        points at a time (the operator's intermediates are the size of a chunk, not of the
        batch); None unless the loss is a loss function, the operators Kronecker-factored and
        the layer calls recordable."""
        lean = not is_task(self.loss) and all(
            isinstance(block.op, KroneckerFactoredCurvature)
            for block in self.composable_block_dict.values()
        )
        if not lean:
            return None
        try:
            signals = SignalRecorder(self.model, self.layers, self.loss, True).record(batch)
        except UnscorableModelError as error:
            logger.debug("Test factors from per-sample gradients: %s.", error)
            return None
        result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name in list(signals):
            a, d = signals.pop(name)
            op = self.composable_block_dict[name].op
            spec = self.layers[name]
            # numbers counted at 8 bytes: the operator may compute in float64
            size = max(1, TEST_CHUNK_BYTES // (spec.out_dim * spec.input_factor_dim * 8))
            factors: Optional[torch.Tensor] = None
            for start in range(0, a.shape[0], size):
                part = slice(start, start + size)
                chunk = op.apply_to_signals(a[part], d[part])  # type: ignore[attr-defined]
                _check_finite(chunk, name)  # NaN or Inf of the signals propagate to it
                if flat:
                    chunk = spec.flat_from_matrix(chunk)
                if factors is None:
                    if chunk.shape[0] == a.shape[0]:
                        factors = chunk
                        break
                    factors = chunk.new_empty((a.shape[0], *chunk.shape[1:]))
                factors[part] = chunk
                del chunk
            del a, d
            assert factors is not None
            result[name] = factors
        return result

    def _test_matrices(self, batch: TorchBatch) -> "OrderedDict[str, torch.Tensor]":
        """The test factors of a batch as matrices `(N, m, k)` by block (see
        `_lean_factors`); otherwise the blocks' factors, reshaped."""
        lean = self._lean_factors(batch, flat=False)
        if lean is not None:
            return lean
        return self._factor_matrices(super().transformed_grads(batch))

    def transformed_grads(self, batch: TorchBatch) -> "OrderedDict[str, torch.Tensor]":
        """The test factors of a batch as rows `(N, P_b)` by block, from the layers' inputs and
        output gradients where possible (see `_lean_factors`)."""
        lean = self._lean_factors(batch, flat=True)
        return super().transformed_grads(batch) if lean is None else lean

    def generate_transformed_grads(self, batch: TorchBatch) -> Generator[torch.Tensor, None, None]:
        factors = self.transformed_grads(batch)
        for name in list(factors):
            yield factors.pop(name)

    def _training_scores(
        self, matrices: "OrderedDict[str, torch.Tensor]", batch: TorchBatch, summed: bool = False
    ) -> "OrderedDict[str, torch.Tensor]":
        """Up interactions of test factors (matrices by block) with the training points of
        `batch`; with `summed`, every block's entry is one tensor accumulating the sum over
        blocks."""
        q, n = next(iter(matrices.values())).shape[0], len(batch)
        shared = next(iter(matrices.values())).new_zeros((q, n)) if summed else None
        scores = OrderedDict(
            (name, v.new_zeros((q, n)) if shared is None else shared)
            for name, v in matrices.items()
        )
        # a chunk's signals may take half the size of the test factors (held anyway), so
        # that the products with the factors are large enough to run at the speed of the
        # arithmetic rather than of reading the factors once per few training points
        factor_bytes = sum(v.numel() for v in matrices.values()) * self._element_size
        for start, stop, signals in self._chunks(batch, factor_bytes // 2):
            if signals is None:
                rest = batch.rows(start, stop)
                for name, block in self.composable_block_dict.items():
                    flat = self.layers[name].flat_from_matrix(matrices[name])
                    scores[name][:, start:] += block.interactions_from_transformed_grads(
                        flat, rest, InfluenceMode.Up
                    )
                break
            for name, (a, d) in signals.items():
                target = scores[name][:, start:stop]
                for part in self._parts(name, q, a):
                    values = layer_scores(matrices[name], a[part], d[part])
                    _check_finite(values, name)
                    target[:, part] += values
        return scores

    def _perturbation_scores(
        self, factors: "OrderedDict[str, torch.Tensor]", batch: TorchBatch
    ) -> "OrderedDict[str, torch.Tensor]":
        """Perturbation interactions by block, in chunks of training points."""
        result: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name, block in self.composable_block_dict.items():
            gp = block.gradient_provider
            features = int(torch.Size(gp.perturbation_shape(batch)).numel())
            element = torch.empty((), dtype=self._dtype).element_size()
            size = max(MIN_CHUNK, self.chunk_bytes // (element * features * gp.input_size))
            parts = [
                block.interactions_from_transformed_grads(
                    factors[name], batch.rows(start, start + size), InfluenceMode.Perturbation
                )
                for start in range(0, len(batch), size)
            ]
            result[name] = torch.cat(parts, dim=1)
        return result

    def interactions(
        self, left_batch: TorchBatch, right_batch: Optional[TorchBatch], mode: InfluenceMode
    ) -> "OrderedDict[str, torch.Tensor]":
        mode = check_mode(mode)
        if right_batch is None:
            return super().interactions(left_batch, right_batch, mode)
        if mode is InfluenceMode.Up:
            return self._training_scores(self._test_matrices(left_batch), right_batch)
        return self._perturbation_scores(super().transformed_grads(left_batch), right_batch)

    def generate_interactions(
        self, left_batch: TorchBatch, right_batch: Optional[TorchBatch], mode: InfluenceMode
    ) -> Generator[torch.Tensor, None, None]:
        yield from self.interactions(left_batch, right_batch, mode).values()

    def summed_interactions(
        self, left_batch: TorchBatch, right_batch: Optional[TorchBatch], mode: InfluenceMode
    ) -> torch.Tensor:
        """`Up` interactions summed over blocks, accumulated in one `(N_left, N_right)` tensor."""
        mode = check_mode(mode)
        if right_batch is None or mode is not InfluenceMode.Up:
            return super().summed_interactions(left_batch, right_batch, mode)
        scores = self._training_scores(self._test_matrices(left_batch), right_batch, True)
        return next(iter(scores.values()))

    def summed_interactions_from_transformed_grads(
        self,
        left_factors: Union[torch.Tensor, "OrderedDict[str, torch.Tensor]"],
        right_batch: TorchBatch,
        mode: InfluenceMode,
    ) -> torch.Tensor:
        mode = check_mode(mode)
        if mode is not InfluenceMode.Up:
            return super().summed_interactions_from_transformed_grads(
                left_factors, right_batch, mode
            )
        matrices = self._left_matrices(left_factors)
        return next(iter(self._training_scores(matrices, right_batch, True).values()))

    def interactions_from_transformed_grads(
        self,
        left_factors: Union[torch.Tensor, "OrderedDict[str, torch.Tensor]"],
        right_batch: TorchBatch,
        mode: InfluenceMode,
    ) -> "OrderedDict[str, torch.Tensor]":
        mode = check_mode(mode)
        if mode is InfluenceMode.Up:
            return self._training_scores(self._left_matrices(left_factors), right_batch)
        return self._perturbation_scores(self._to_block_dict(left_factors), right_batch)

    def generate_interactions_from_transformed_grads(
        self,
        left_factors: Union[torch.Tensor, "OrderedDict[str, torch.Tensor]"],
        right_batch: TorchBatch,
        mode: InfluenceMode,
    ) -> Generator[torch.Tensor, None, None]:
        yield from self.interactions_from_transformed_grads(
            left_factors, right_batch, mode
        ).values()

    def self_interactions(
        self, batch: TorchBatch, mode: InfluenceMode
    ) -> "OrderedDict[str, torch.Tensor]":
        r"""Self-influences by block; for `Up`, chunk by chunk from the per-sample gradients
        $\sum_t \delta_t \tilde a_t^\top$ of each chunk."""
        mode = check_mode(mode)
        if mode is not InfluenceMode.Up:
            return super().self_interactions(batch, mode)
        result = OrderedDict(
            (name, torch.empty(len(batch), dtype=self._dtype, device=block.op.device))
            for name, block in self.composable_block_dict.items()
        )
        for start, stop, signals in self._chunks(batch):
            if signals is None:
                rest = batch.rows(start, stop)
                for name, values in super().self_interactions(rest, mode).items():
                    result[name][start:] = values
                break
            for name, (a, d) in signals.items():
                op, spec = self.composable_block_dict[name].op, self.layers[name]
                target = result[name][start:stop]
                # the per-sample gradients and their images under the operator
                for part in self._parts(name, 0, a):
                    grads = spec.flat_from_matrix(torch.einsum("ntm,ntk->nmk", d[part], a[part]))
                    target[part] = (op.apply(grads).to(grads.dtype) * grads).sum(dim=1)
                _check_finite(target, name)
        return result


def layer_block_mapper(
    blocks: "OrderedDict[str, TorchOperatorGradientComposition]",
    model: torch.nn.Module,
    loss: LossOrTask,
    chunk_bytes: int = SCORE_CHUNK_BYTES,
) -> TorchBlockMapper:
    """A [KroneckerBlockMapper][influx.torch.kfac.scoring.KroneckerBlockMapper] if every block is
    the trainable weight and / or bias of one `Linear` or `Conv2d` layer (in this order), else
    a plain [TorchBlockMapper][influx.torch.composition.block_mapper.TorchBlockMapper]."""
    names = [name for block in blocks.values() for name in block.gradient_provider.params]
    specs = layers_for_parameters(model, names)
    matching = list(specs) == list(blocks) and all(
        list(block.gradient_provider.params) == specs[name].parameter_names
        for name, block in blocks.items()
    )
    if not matching:
        return TorchBlockMapper(blocks)
    return KroneckerBlockMapper(blocks, model, loss, specs, chunk_bytes)
