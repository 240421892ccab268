r"""Query batching: the test factors of Kronecker-factored layers at low rank.

The test factor of a `Linear` / `Conv1D` / `Conv2d` layer is a matrix $U_i$ `(m, k)` (the
layer's part of $(C + \lambda I)^{-1} \nabla_\theta m(z'_i)$, outputs by inputs with the bias
column). Its truncated singular value decomposition
$U_i \approx L_i R_i^\top$, $L_i = [\sigma_1 u_1, \dots, \sigma_r u_r]$ `(m, r)`,
$R_i = [v_1, \dots, v_r]$ `(k, r)`, keeps $r(m + k)$ numbers instead of $mk$ per query (many
queries fit in memory and in one pass over the training data), and the score of a training
position becomes $\delta_s^\top L_i R_i^\top \tilde a_s = \sum_{j \le r} (\delta_s^\top
L_{i,j})(R_{i,j}^\top \tilde a_s)$.

The rank is one per layer: given (`rank`), or the smallest meeting a budget on the relative
Frobenius error of every query's factor,

$$
\frac{\lVert U_i - L_i R_i^\top \rVert_F}{\lVert U_i \rVert_F}
= \sqrt{\frac{\sum_{j > r} \sigma_{ij}^2}{\sum_j \sigma_{ij}^2}} \le \varepsilon
\quad \text{for all } i .
$$

At full rank ($r = \min(m, k)$) the factors are the exact ones.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch

from .layers import layers_for_parameters

__all__ = ["LowRankFactors", "low_rank_matrices", "low_rank_query_factors", "rank_for_error"]

logger = logging.getLogger(__name__)

LowRankFactors = Tuple[torch.Tensor, torch.Tensor]
"""`(L, R)`: `(n, m, r)` and `(n, k, r)`, with $U_i \\approx L_i R_i^\\top$."""


def rank_for_error(singular_values: torch.Tensor, error: float) -> int:
    r"""The smallest rank $r$ whose truncation of every row of `singular_values` `(n, q)`
    (descending) has a relative Frobenius error of at most `error`."""
    if isinstance(error, bool) or not isinstance(error, (int, float)) or not 0 <= error < 1:
        raise ValueError(f"Parameter 'error' must be a number in [0, 1), got {error!r}.")
    squares = singular_values.square()
    total = squares.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(squares.dtype).tiny)
    # tail[:, r] = the squared relative error of truncating at rank r, for r = 0 .. q
    tail = squares.flip(-1).cumsum(-1).flip(-1) / total
    tail = torch.cat([tail, tail.new_zeros(tail.shape[0], 1)], dim=-1)
    meets = (tail.sqrt() <= error).all(dim=0)
    return int(torch.nonzero(meets)[0, 0])


def low_rank_matrices(
    matrices: torch.Tensor, rank: Optional[int] = None, error: Optional[float] = None
) -> Tuple[LowRankFactors, int]:
    """The rank-$r$ truncated SVD `((L, R), r)` of matrices `(n, m, k)`, with the rank given
    or the smallest meeting the relative Frobenius `error` for every matrix (see the
    module); exactly one of `rank` and `error`."""
    if (rank is None) == (error is None):
        raise ValueError(
            "Pass exactly one of parameters 'rank' and 'error' (the rank of the test factors, "
            f"or the budget on their relative Frobenius error), got rank={rank!r}, "
            f"error={error!r}."
        )
    if matrices.ndim != 3:
        raise ValueError(
            f"Parameter 'matrices' must have shape (n, m, k), got {tuple(matrices.shape)}."
        )
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    if rank is None:
        assert error is not None
        rank = rank_for_error(s, error)
    elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Parameter 'rank' must be a positive int, got {rank!r}.")
    rank = min(rank, s.shape[-1])
    left = u[..., :rank] * s[..., None, :rank]
    return (left, vh[..., :rank, :].transpose(-1, -2)), rank


def low_rank_query_factors(
    influence: Any,
    factors: torch.Tensor,
    rank: Optional[int] = None,
    error: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, int]]:
    """The test factors `(n, F)` of a fitted model (from `influence_factors`) with the part
    of every Kronecker-factored layer (a block of one `Linear`, `Conv1D` or `Conv2d`) replaced
    by its rank-$r$ approximation $L_i R_i^\\top$, and the rank chosen for every such layer;
    the other blocks are unchanged. The result pairs with training data as the exact factors
    do (`influences_from_factors`, the calculators).

    Args:
        influence: a fitted influence model made of blocks (`block_mapper`).
        factors: its factors `(n, F)`, concatenated over blocks.
        rank: the rank of every layer's factors (at most $\\min(m, k)$).
        error: or the budget on the relative Frobenius error of every query's factor in each
            layer: the smallest rank meeting it, layer by layer.
    """
    blocks = influence.block_mapper.composable_block_dict
    sizes = [block.op.input_size for block in blocks.values()]
    if factors.ndim != 2 or factors.shape[1] != sum(sizes):
        raise ValueError(
            f"Parameter 'factors' must have shape (N, {sum(sizes)}), got {tuple(factors.shape)}."
        )
    parts = OrderedDict(zip(blocks, torch.split(factors, sizes, dim=1)))
    ranks: Dict[str, int] = {}
    for name, block in blocks.items():
        if getattr(block.gradient_provider, "projection", None) is not None:
            continue
        found = layers_for_parameters(influence.model, block.gradient_provider.params)
        if len(found) != 1:
            continue
        spec = next(iter(found.values()))
        if list(block.gradient_provider.params) != spec.parameter_names:
            continue
        (left, right), ranks[name] = low_rank_matrices(
            spec.matrix_from_flat(parts[name]), rank, error
        )
        parts[name] = spec.flat_from_matrix(left @ right.transpose(-1, -2))
    if not ranks:
        raise ValueError(
            "Parameter 'influence' has no block of one Kronecker-factored layer (Linear, "
            "Conv1D, Conv2d) whose test factors could be approximated."
        )
    logger.debug("Query factors at ranks %s.", ranks)
    return torch.cat(list(parts.values()), dim=1), ranks
