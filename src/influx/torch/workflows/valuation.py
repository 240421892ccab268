r"""Answers from influences: harmful-sample ranking and the top-k training points per test point.

Sign convention (as everywhere in influx, see the docs page "Influence, sign and scale"):
$I(z', z) = \nabla_\theta \ell(z')^\top (C + \lambda I)^{-1} \nabla_\theta \ell(z)$ is
**positive when training point $z$ helps test point $z'$** (up-weighting it lowers the test
loss) and negative when it hurts.

Everything here streams over the training data in chunks: memory does not grow with the
number of training points beyond one value per point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

from tqdm.auto import tqdm

import torch

from ...types import InfluenceMode, NotFittedException, SolverDiagnostics
from ..composition.composable import TorchComposableInfluence
from ..data.batches import TorchBatch, iterate_batches
from ..data.validation import check_ordered

__all__ = [
    "HarmfulRanking",
    "TopKInfluences",
    "rank_training_points",
    "top_k_from_array",
    "top_k_influences",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HarmfulRanking:
    """Training points ordered from most harmful to most helpful.

    Attributes:
        indices: training indices, most harmful (most negative total influence) first.
        values: the total influence of each training point on the validation set,
            $\\sum_i I(z'_i, z_j)$, indexed by training index (not by rank).
        converged: whether the solve of every block reached its tolerance (False: the
            values are approximate; see `solver_diagnostics`).
        solver_diagnostics: per block, what its solver reported for the ranking's solve
            (None for blocks that do not solve a system).
    """

    indices: torch.Tensor
    values: torch.Tensor
    converged: bool = True
    solver_diagnostics: Optional[Dict[str, Optional[SolverDiagnostics]]] = None

    def most_harmful(self, k: int) -> torch.Tensor:
        """The indices of the `k` most harmful training points."""
        return self.indices[:k]


@dataclass(frozen=True)
class TopKInfluences:
    """For each test point, the `k` most helpful and `k` most harmful training points.

    Attributes:
        helpful_indices: `(n_test, k)` training indices, largest influence first.
        helpful_values: `(n_test, k)` their influences.
        harmful_indices: `(n_test, k)` training indices, most negative influence first.
        harmful_values: `(n_test, k)` their influences.
    """

    helpful_indices: torch.Tensor
    helpful_values: torch.Tensor
    harmful_indices: torch.Tensor
    harmful_values: torch.Tensor


def _check_fitted(model: Any) -> TorchComposableInfluence:
    if not isinstance(model, TorchComposableInfluence):
        raise TypeError(
            "Parameter 'model' must be a torch influence model (TorchComposableInfluence), got "
            f"{type(model).__name__}."
        )
    if not model.is_fitted:
        raise NotFittedException(type(model))
    return model


def _batches(model: TorchComposableInfluence, data: Iterable, name: str) -> Iterator[TorchBatch]:
    """The batches of `data` as the model computes on them (device, compute dtype, checks)."""
    for batch in iterate_batches(data, model.device, name):
        yield model._create_batch(batch.x, batch.y)


def rank_training_points(
    model: TorchComposableInfluence,
    train_data: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    validation_data: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    progress: bool = False,
) -> HarmfulRanking:
    r"""Rank training points by their total influence on a validation set, most harmful first.

    The total influence of training point $z_j$ on the validation set is

    $$
    T_j = \sum_i I(z'_i, z_j)
        = \Big(\sum_i \nabla_\theta \ell(z'_i)\Big)^\top (C + \lambda I)^{-1}
          \nabla_\theta \ell(z_j) ,
    $$

    so the summed validation gradient is solved once per block (one right-hand side, whatever
    the size of the validation set), then paired with each training gradient. A negative
    $T_j$ means that removing $z_j$ would lower the validation loss: mislabeled or otherwise
    harmful points come first.

    Args:
        model: a fitted influence model.
        train_data: the training points to rank, an iterable of `(x, y)` batches (e.g. a
            non-shuffling DataLoader); indices follow its order.
        validation_data: the validation points, an iterable of `(x, y)` batches.
        progress: show a progress bar over the training batches.

    Returns:
        The ranking and the total influence of every training point, with whether the solves
        converged and their diagnostics.

    Raises:
        UnorderedDataError: if `train_data` is a data loader with a random (shuffling) or
            otherwise non-sequential sampler: the indices would not be those of the samples.
    """
    model = _check_fitted(model)
    check_ordered(train_data, "train_data")
    blocks = model.block_mapper.composable_block_dict
    summed: Dict[str, torch.Tensor] = {}
    for batch in _batches(model, validation_data, "validation_data"):
        for name, block in blocks.items():
            g = block.gradient_provider.flat_grads(batch.as_test()).sum(dim=0, keepdim=True)
            summed[name] = g + summed[name] if name in summed else g
    if not summed:
        raise ValueError("Parameter 'validation_data' yielded no batches.")
    factors = {name: block.op.apply(summed[name]) for name, block in blocks.items()}
    diagnostics = {name: block.op.diagnostics for name, block in blocks.items()}
    converged = all(d is None or d.converged for d in diagnostics.values())
    if not converged:
        logger.warning(
            "The ranking is approximate: the solve did not converge for blocks %s.",
            [name for name, d in diagnostics.items() if d is not None and not d.converged],
        )
    values = []
    batches = _batches(model, train_data, "train_data")
    for batch in tqdm(batches, desc="ranking", disable=not progress, leave=False):
        total = sum(
            block.interactions_from_transformed_grads(factors[name], batch, InfluenceMode.Up)[0]
            for name, block in blocks.items()
        )
        values.append(total)
    if not values:
        raise ValueError("Parameter 'train_data' yielded no batches.")
    all_values = torch.cat(values)  # type: ignore[arg-type]
    return HarmfulRanking(
        torch.argsort(all_values, stable=True), all_values, converged, diagnostics
    )


def _merge_top_k(
    values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    top = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest)
    return top.values, torch.gather(indices, 1, top.indices)


def top_k_influences(
    model: TorchComposableInfluence,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    train_data: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    k: int,
    progress: bool = False,
) -> TopKInfluences:
    r"""The `k` most helpful and most harmful training points for each test point, streamed.

    Influence factors of the test points are computed once; each training batch contributes
    its influences, merged into running top-k lists, so memory is
    $O(n_\text{test} \cdot (k + \text{batch size}))$ whatever the number of training points.
    Equal to `torch.topk` of the full influence matrix (ties may be ordered differently).

    Args:
        model: a fitted influence model.
        x_test: test inputs.
        y_test: test targets.
        train_data: an iterable of `(x, y)` training batches; indices follow its order.
        k: how many points per list, at least 1 and at most the number of training points.
        progress: show a progress bar over the training batches.

    Raises:
        UnorderedDataError: if `train_data` is a data loader with a random (shuffling) or
            otherwise non-sequential sampler.
    """
    model = _check_fitted(model)
    check_ordered(train_data, "train_data")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Parameter 'k' must be a positive integer, got {k!r}.")
    factors = model.influence_factors(x_test, y_test)
    return _stream_top_k(
        (
            (batch.x, model.influences_from_factors(factors, batch.x, batch.y))
            for batch in tqdm(
                _batches(model, train_data, "train_data"),
                desc="top-k",
                disable=not progress,
                leave=False,
            )
        ),
        k,
    )


def top_k_from_array(
    influences: Any, k: int, column_chunk: Optional[int] = None, progress: bool = False
) -> TopKInfluences:
    """The `k` largest and smallest entries of each row of a stored influence matrix.

    Reads the matrix (e.g. a zarr array written by a calculator, or a numpy array) in column
    blocks of `column_chunk` (default: the array's own chunking along the training axis, or
    1024), so memory does not grow with the number of training points.

    Args:
        influences: a 2-D array-like `(n_test, n_train)` supporting slicing.
        k: how many entries per list.
        column_chunk: the number of training columns read at a time.
        progress: show a progress bar.
    """
    shape = tuple(influences.shape)
    if len(shape) != 2:
        raise ValueError(
            f"Parameter 'influences' must be a 2-D (n_test, n_train) matrix, got shape {shape}."
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Parameter 'k' must be a positive integer, got {k!r}.")
    if column_chunk is None:
        chunks = getattr(influences, "chunks", None)
        column_chunk = int(chunks[1]) if chunks else 1024
    step = int(column_chunk)

    def blocks() -> Iterator[Tuple[None, torch.Tensor]]:
        for start in tqdm(
            range(0, shape[1], step), desc="top-k", disable=not progress, leave=False
        ):
            yield None, torch.as_tensor(influences[:, start : start + step])

    return _stream_top_k(blocks(), k)


def _stream_top_k(chunks: Iterable[Tuple[Any, torch.Tensor]], k: int) -> TopKInfluences:
    best: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    worst: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    offset = 0
    for _, values in chunks:
        n_test, n = values.shape[0], values.shape[1]
        idx = torch.arange(offset, offset + n, device=values.device).expand(n_test, n)
        offset += n
        if best is None or worst is None:
            best = _merge_top_k(values, idx, k, largest=True)
            worst = _merge_top_k(values, idx, k, largest=False)
            continue
        best = _merge_top_k(
            torch.cat([best[0], values], 1), torch.cat([best[1], idx], 1), k, largest=True
        )
        worst = _merge_top_k(
            torch.cat([worst[0], values], 1), torch.cat([worst[1], idx], 1), k, largest=False
        )
    if best is None or worst is None:
        raise ValueError("The training data yielded no batches.")
    if offset < k:
        raise ValueError(
            f"Parameter 'k' must be at most the number of training points {offset}, got {k}."
        )
    return TopKInfluences(best[1], best[0], worst[1], worst[0])
