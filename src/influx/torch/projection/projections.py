r"""Random projections of per-sample gradients, and their curvature in the projected space.

A projection $P_b \in \mathbb{R}^{k \times p_b}$ of a block of $p_b$ parameters maps every
per-sample gradient $g = \nabla_{\theta_b} \ell(z)$ to $P_b g \in \mathbb{R}^k$. Influence is
then computed exactly in the projected space,

$$
I(z', z) = (P_b g')^\top \big(P_b C_b P_b^\top + \lambda I\big)^{-1} (P_b g) ,
$$

with the curvature $C_b$ (the empirical Fisher or the generalized Gauss-Newton matrix)
formed only as the $k \times k$ matrix $P_b C_b P_b^\top$. For a square orthogonal $P_b$ this is
the unprojected influence; as $k$ grows it approaches it (entries of the random matrices have
variance $1/k$, so that $\mathbb{E}[P^\top P] = I$).

**Kronecker projections.** For a `Linear` or `Conv2d` layer with output $s_t = \tilde W \tilde
a_t$ at positions $t$ (a sequence, or the pixels of a convolution whose input is unfolded into
patches), the per-sample gradient of $\tilde W = [W \mid b]$ is
$\sum_t \delta_t \tilde a_t^\top$ with $\delta_t = \partial \ell / \partial s_t$. The projection
$P_{out} \otimes P_{in}$ of its row-major flattening is

$$
P_{out} \Big(\sum_t \delta_t \tilde a_t^\top\Big) P_{in}^\top
= \sum_t (P_{out}\delta_t)(P_{in}\tilde a_t)^\top ,
$$

computed from the layer's inputs and output gradients (module hooks on one forward and one
backward pass) without forming the $m \times d$ gradient of any sample. The other parameters
of a block, and every parameter with the dense projections (`"gaussian"`, `"rademacher"`),
are projected from their flattened per-sample gradients, column chunk by column chunk, each
chunk of $P$ generated from the seed (and kept if the whole matrix fits in a memory budget).

A block's projected dimension is shared out among its layers in equal parts, a layer getting
at most its number of parameters (the rest goes to the others); a layer's share $k_l$ is split
as $k_{out} \cdot k_{in} \le k_l$ with $k_{out} \le m$, $k_{in} \le d$, as balanced as
possible. With $k \ge p_b$ every layer gets its full size and the projection is square.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from torch.nn import functional as F

import torch

from ..kfac.layers import LayerSpec, layers_for_parameters
from .random_matrices import orthonormal_rows, random_matrix

__all__ = [
    "PROJECTIONS",
    "BlockProjection",
    "DenseProjection",
    "KroneckerLayerProjection",
    "allocate_dimensions",
    "default_projection_dim",
    "kronecker_shape",
    "random_matrix",
]

logger = logging.getLogger(__name__)

PROJECTIONS = ("kronecker", "gaussian", "rademacher")
"""The kinds of projection: Kronecker-structured per layer, or dense Gaussian / Rademacher."""

DENSE_CHUNK_COLUMNS = 4096
"""Columns of a dense projection generated from one seed (part of its definition)."""


DEFAULT_DIM_RANGE = (1024, 8192)
"""The smallest and largest projected dimension the default rule chooses (below $p$)."""


def default_projection_dim(n_parameters: int) -> int:
    r"""The default projected dimension of a block of $p$ parameters,

    $$
    k(p) = \min\big(p,\ \max(1024,\ \min(8192,\ \lceil 2 \sqrt{p}\, \rceil))\big) .
    $$

    A fixed $k$ loses accuracy as the model grows (more directions of the gradients compete
    for the same coordinates); $k$ grows as $2\sqrt{p}$ from $p \approx 262{,}000$ on, so that
    the $k \times k$ curvature ($8 k^2$ bytes in float64) stays of the order of the model
    itself ($32 p$ bytes), and is capped at 8192 (512 MB): 1024 up to about 262 k parameters,
    2098 at 1.1 M, 6694 at 11.2 M (ResNet-18; a 358 MB curvature), 8192 from 17 M on. Below
    1024 parameters the projection is square (exact with orthogonal rows). The distortion
    estimate of [ProjectedInfluence][influx.torch.models.projected.ProjectedInfluence] says
    whether the chosen $k$ suffices for the data at hand.
    """
    if isinstance(n_parameters, bool) or not isinstance(n_parameters, int) or n_parameters < 1:
        raise ValueError(f"Parameter 'n_parameters' must be an int >= 1, got {n_parameters!r}.")
    low, high = DEFAULT_DIM_RANGE
    return min(n_parameters, max(low, min(high, math.ceil(2 * math.sqrt(n_parameters)))))


def allocate_dimensions(capacities: Sequence[int], total: int) -> List[int]:
    """Share `total` among parts in equal shares, each at most its capacity (water-filling).

    Returns:
        one share per part; their sum is `min(total, sum(capacities))`.
    """
    shares = [0] * len(capacities)
    remaining = min(total, sum(capacities))
    open_parts = [i for i, c in enumerate(capacities) if c > 0]
    while remaining > 0 and open_parts:
        base, extra = divmod(remaining, len(open_parts))
        still_open = []
        for rank, i in enumerate(open_parts):
            give = min(capacities[i] - shares[i], base + (1 if rank < extra else 0))
            shares[i] += give
            remaining -= give
            if shares[i] < capacities[i]:
                still_open.append(i)
        open_parts = still_open
    return shares


def kronecker_shape(share: int, out_dim: int, in_dim: int) -> Tuple[int, int]:
    r"""$(k_{out}, k_{in})$ with $k_{out} \le$ `out_dim`, $k_{in} \le$ `in_dim`, the largest
    product $\le$ `share`, and among those the most balanced."""
    best = (1, 1)
    best_key = (-1, 0.0)
    for k_out in range(1, min(out_dim, share) + 1):
        k_in = min(in_dim, share // k_out)
        if k_in < 1:
            continue
        key = (k_out * k_in, -abs(math.log(k_out / k_in)))
        if key > best_key:
            best, best_key = (k_out, k_in), key
    return best


class DenseProjection:
    r"""A dense random projection $P$ `(k, p)`, generated in chunks of
    `DENSE_CHUNK_COLUMNS` columns, each from its own seed (so its entries do not depend on
    how or when it is generated).

    **Generated once.** A matrix of at most `max_cache_bytes` (counted in float64) is
    generated once, when the projection is built (at `fit`), and kept: every batch, test
    batch and sub-batch is projected by the same tensor, whatever the batch sizes and
    order. Its copy in the dtype and device of the gradients is made on first use and kept
    too. With `orthogonal`, the rows of a kept matrix are made orthogonal (scaled so that
    $\mathbb{E}[P^\top P] = I$).

    **Over the budget** (a dense matrix for millions of parameters: $k = 1024$ columns of
    11 M parameters are 90 GB in float64) the matrix cannot be kept. The leading column
    chunks that fit in the budget are still generated once and kept; the others are
    regenerated from their seeds, in a fixed order, for every application (a sub-batch of
    per-sample gradients), which costs $k$ random numbers per remaining column each time:
    a warning says so when the projection is built. The rows are left as drawn (nearly
    orthogonal for $k \ll p$). The Kronecker projection (the default of
    [ProjectedInfluence][influx.torch.models.projected.ProjectedInfluence]) has no such
    matrix and is the one for large models.

    `generations` counts the passes that drew random numbers: 1 for a kept matrix, one more
    per application over the budget.

    Args:
        size: $p$, the number of coordinates projected.
        dim: $k$.
        distribution: `"gaussian"` or `"rademacher"`.
        seed: the seed.
        label: distinguishes the projections of different blocks with the same seed.
        orthogonal: make the rows orthonormal.
        max_cache_bytes: memory budget of the kept matrix.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        distribution: str,
        seed: int,
        label: str,
        orthogonal: bool = True,
        max_cache_bytes: float = 2**28,
    ):
        self.size, self.dim = int(size), int(dim)
        self.distribution, self.seed, self.label = distribution, int(seed), label
        self.n_chunks = -(-self.size // DENSE_CHUNK_COLUMNS)
        self._keep = self.size * self.dim * 8 <= max_cache_bytes
        self.orthogonal = orthogonal and self._keep
        self.generations = 0
        """How many times random numbers were drawn for this projection."""
        self._cast: Optional[torch.Tensor] = None
        if self._keep:
            matrix = self._generate(range(self.n_chunks))
            self._matrix = orthonormal_rows(matrix) if self.orthogonal else matrix
            self._kept_chunks = self.n_chunks
        else:
            chunk_bytes = self.dim * DENSE_CHUNK_COLUMNS * 8
            self._kept_chunks = min(self.n_chunks, int(max_cache_bytes // chunk_bytes))
            self._matrix = self._generate(range(self._kept_chunks))
            logger.warning(
                "Projection %r: a dense %d x %d matrix takes %.1f GB, over the memory budget "
                "(max_cache_mb = %.0f); %d of its %d column chunks are regenerated for every "
                "sub-batch of per-sample gradients (%d random numbers each time) and its rows "
                "are not orthogonalised. Use projection='kronecker' for a model of this size, "
                "or raise max_cache_mb.",
                label,
                self.dim,
                self.size,
                self.size * self.dim * 8 / 2**30,
                max_cache_bytes / 2**20,
                self.n_chunks - self._kept_chunks,
                self.n_chunks,
                self.dim * max(0, self.size - self._kept_chunks * DENSE_CHUNK_COLUMNS),
            )

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_cast"] = None  # the copy in the gradients' dtype is made again on first use
        return state

    @property
    def cached(self) -> bool:
        """Whether the whole matrix is kept (generated once)."""
        return self._keep

    def _chunk(self, index: int) -> torch.Tensor:
        start = index * DENSE_CHUNK_COLUMNS
        width = min(DENSE_CHUNK_COLUMNS, self.size - start)
        # Scaled by 1/sqrt(k) as a whole, whatever the chunking.
        return random_matrix(
            self.dim, width, self.distribution, self.seed, [self.label, str(index)]
        )

    def _generate(self, indices: range) -> torch.Tensor:
        self.generations += 1
        if len(indices) == 0:
            return torch.zeros(self.dim, 0, dtype=torch.float64)
        return torch.cat([self._chunk(i) for i in indices], dim=1)

    def matrix(self) -> torch.Tensor:
        """$P$ as a float64 CPU tensor `(k, p)` (generated again over the budget)."""
        if self._keep:
            return self._matrix
        return torch.cat([self._matrix, self._generate(range(self._kept_chunks, self.n_chunks))], 1)

    def _kept(self, like: torch.Tensor) -> torch.Tensor:
        """The kept columns in the dtype and device of `like` (converted once)."""
        cast = self._cast
        if cast is None or cast.dtype != like.dtype or cast.device != like.device:
            cast = self._matrix.to(device=like.device, dtype=like.dtype)
            self._cast = cast
        return cast

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """$P v$ for the last dimension of `values` `(..., p)`, result `(..., k)`."""
        kept = self._kept(values)
        width = kept.shape[1]
        result = values[..., :width] @ kept.T
        if self._keep:
            return result
        self.generations += 1
        for index in range(self._kept_chunks, self.n_chunks):
            start = index * DENSE_CHUNK_COLUMNS
            chunk = self._chunk(index).to(device=values.device, dtype=values.dtype)
            result += values[..., start : start + chunk.shape[1]] @ chunk.T
        return result


class _CastFactors(NamedTuple):
    """A layer's projection factors in one device and dtype: $P_{out}$, $P_{in}$, and the
    columns of $P_{in}$ for the weight (as convolution filters for a `Conv2d`) and the bias."""

    p_out: torch.Tensor
    p_in: torch.Tensor
    rows: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


class KroneckerLayerProjection:
    r"""$P_{out} \otimes P_{in}$ for one `Linear` / `Conv2d` layer, `(k_out, m)` and `(k_in, d)`
    with $d$ the size of $\tilde a$ (the weight's columns, plus one for a bias).

    Args:
        spec: the layer (which of its weight and bias are projected).
        k_out: rows of $P_{out}$.
        k_in: rows of $P_{in}$.
        seed: the seed.
        label: distinguishes layers and blocks.
        orthogonal: make the rows of both factors orthogonal (scaled, see `DenseProjection`).
    """

    def __init__(
        self, spec: LayerSpec, k_out: int, k_in: int, seed: int, label: str, orthogonal: bool
    ):
        self.spec = spec
        p_out = random_matrix(k_out, spec.out_dim, "gaussian", seed, [label, "out"])
        p_in = random_matrix(k_in, spec.input_factor_dim, "gaussian", seed, [label, "in"])
        if orthogonal:
            p_out, p_in = orthonormal_rows(p_out), orthonormal_rows(p_in)
        self.p_out, self.p_in = p_out, p_in
        self._cast: Dict[Tuple[torch.device, torch.dtype], _CastFactors] = {}

    @property
    def dim(self) -> int:
        return int(self.p_out.shape[0] * self.p_in.shape[0])

    def _cast_factors(self, like: torch.Tensor) -> "_CastFactors":
        """The factors on the device and in the dtype of `like`, converted once."""
        key = (like.device, like.dtype)
        cast = self._cast.get(key)
        if cast is None:
            p_out = self.p_out.to(device=like.device, dtype=like.dtype)
            p_in = self.p_in.to(device=like.device, dtype=like.dtype)
            spec, module = self.spec, self.spec.module
            rows = bias = None
            if spec.weight_name is not None:
                rows = p_in[:, : spec.in_dim].contiguous()
                if isinstance(module, torch.nn.Conv2d):
                    rows = rows.reshape(rows.shape[0], *module.weight.shape[1:])
                if spec.bias_name is not None:
                    bias = p_in[:, spec.in_dim].contiguous()
            cast = self._cast[key] = _CastFactors(p_out, p_in, rows, bias)
        return cast

    def _factors(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cast = self._cast_factors(like)
        return cast.p_out, cast.p_in

    def project_signals(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        r"""$\sum_t (P_{out}\delta_t)(P_{in}\tilde a_t)^\top$ flattened, `(N, k_out k_in)`, from
        $\tilde a$ `(N, T, d)` and $\delta$ `(N, T, m)` (leading dimensions may be more)."""
        p_out, p_in = self._factors(inputs)
        left = output_grads @ p_out.T
        right = inputs @ p_in.T
        return torch.einsum("...tk,...tj->...kj", left, right).flatten(-2)

    def projected_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        r"""$P_{in} \tilde a_t$ of every position, `(N, T, k_in)`, from the layer's raw input.

        For a convolution this is itself a convolution of the input with the $k_{in}$ rows of
        $P_{in}$ as filters and the bias column of $P_{in}$ as their bias (the patches are
        never unfolded); for a linear layer an affine map.
        """
        spec, module = self.spec, self.spec.module
        cast = self._cast_factors(inputs)
        if cast.rows is None:
            return spec.expanded_inputs(inputs) @ cast.p_in.T
        if isinstance(module, torch.nn.Conv2d):
            padding: Any = module.padding
            if module.padding_mode != "zeros" or isinstance(padding, str):
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            projected = F.conv2d(
                inputs, cast.rows, cast.bias, module.stride, padding, module.dilation
            )
            return projected.flatten(2).transpose(1, 2)
        return F.linear(inputs.reshape(inputs.shape[0], -1, spec.in_dim), cast.rows, cast.bias)

    def project_raw(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        r"""As `project_signals`, from the layer's raw input and the gradient of its raw
        output, `(N, k_out k_in)`: one batched product of $P_{out} \delta$ `(N, k_out, T)`
        with $P_{in} \tilde a$ `(N, T, k_in)` (an outer product for a single position)."""
        p_out = self._cast_factors(output_grads).p_out
        right = self.projected_inputs(inputs)
        n = output_grads.shape[0]
        if isinstance(self.spec.module, torch.nn.Conv2d):
            left = p_out @ output_grads.reshape(n, self.spec.out_dim, -1)
        else:
            left = (output_grads.reshape(n, -1, self.spec.out_dim) @ p_out.T).transpose(1, 2)
        if right.shape[1] == 1:
            return (left * right).flatten(1)
        return torch.bmm(left, right).flatten(1)

    def project_gradient(self, parts: Dict[str, torch.Tensor]) -> torch.Tensor:
        r"""$P_{out} \tilde G P_{in}^\top$ flattened for explicit gradients `parts` (by parameter
        name, each `(..., *shape)`), the matrix $\tilde G = [G_W \mid g_b]$."""
        spec = self.spec
        columns: List[torch.Tensor] = []
        if spec.weight_name is not None:
            columns.append(spec.weight_matrix(parts[spec.weight_name]))
        if spec.bias_name is not None:
            columns.append(parts[spec.bias_name].unsqueeze(-1))
        matrix = columns[0] if len(columns) == 1 else torch.cat(columns, dim=-1)
        p_out, p_in = self._factors(matrix)
        return (p_out @ matrix @ p_in.T).flatten(-2)


class BlockProjection:
    r"""The projection of one block: Kronecker projections of its `Linear` / `Conv2d` layers
    (with `kind="kronecker"`) and a dense projection of the remaining parameters.

    The projected coordinates are those of the layers in model order, then the dense part.

    Args:
        model: the model.
        params: the block's parameters by name.
        projection_dim: $k$; the block gets $\min(k, p_b)$ or slightly fewer coordinates (the
            layers' shares are products $k_{out} k_{in}$); None:
            [default_projection_dim][influx.torch.projection.projections.default_projection_dim]
            of the block's size.
        kind: one of [PROJECTIONS][influx.torch.projection.projections.PROJECTIONS].
        seed: the seed of every random matrix.
        block_name: the block's name (part of the seeds).
        orthogonal: make the rows of every random matrix orthogonal.
        max_cache_mb: memory budget of a dense projection kept between applications.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: Dict[str, torch.Tensor],
        projection_dim: Optional[int],
        kind: str,
        seed: int,
        block_name: str,
        orthogonal: bool = True,
        max_cache_mb: float = 256.0,
    ):
        self.names = list(params)
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.size = sum(p.numel() for p in params.values())
        if projection_dim is None:
            projection_dim = default_projection_dim(self.size)
        self.requested_dim = projection_dim
        """$k$ as requested (or chosen by the default rule), before the layers' shares."""
        specs = layers_for_parameters(model, self.names) if kind == "kronecker" else {}
        covered = {n for spec in specs.values() for n in spec.parameter_names}
        self.dense_names = [n for n in self.names if n not in covered]
        dense_size = sum(params[n].numel() for n in self.dense_names)
        capacities = [spec.out_dim * spec.input_factor_dim for spec in specs.values()]
        shares = allocate_dimensions(capacities + [dense_size], projection_dim)
        self.layers: "OrderedDict[str, KroneckerLayerProjection]" = OrderedDict()
        for (name, spec), share in zip(specs.items(), shares):
            if share == 0:
                raise ValueError(
                    f"Parameter 'projection_dim' = {projection_dim} is too small for block "
                    f"{block_name!r}: layer {name!r} would get no coordinate; use at least "
                    f"{len(capacities) + (1 if dense_size else 0)}."
                )
            k_out, k_in = kronecker_shape(share, spec.out_dim, spec.input_factor_dim)
            label = f"{block_name}/{name}"
            self.layers[name] = KroneckerLayerProjection(spec, k_out, k_in, seed, label, orthogonal)
        self.dense: Optional[DenseProjection] = None
        if dense_size:
            distribution = "gaussian" if kind == "kronecker" else kind
            self.dense = DenseProjection(
                dense_size,
                max(1, shares[-1]),
                distribution,
                seed,
                f"{block_name}/dense",
                orthogonal,
                max_cache_mb * 2**20,
            )
        logger.debug(
            "Block %r: %d parameters projected to %d (%s).",
            block_name,
            self.size,
            self.dim,
            ", ".join(f"{n}: {p.p_out.shape[0]}x{p.p_in.shape[0]}" for n, p in self.layers.items()),
        )

    @property
    def dim(self) -> int:
        """The number of projected coordinates."""
        return sum(p.dim for p in self.layers.values()) + (self.dense.dim if self.dense else 0)

    def _split(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        sizes = [math.prod(self.shapes[n]) for n in self.names]
        lead = flat.shape[:-1]
        return {
            n: part.reshape(*lead, *self.shapes[n])
            for n, part in zip(self.names, torch.split(flat, sizes, dim=-1))
        }

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """$P v$ for explicit vectors `(..., p_b)` in the block's parameter order: `(..., k)`."""
        parts = self._split(flat)
        pieces = [layer.project_gradient(parts) for layer in self.layers.values()]
        if self.dense is not None:
            lead = flat.shape[:-1]
            rest = torch.cat([parts[n].reshape(*lead, -1) for n in self.dense_names], dim=-1)
            pieces.append(self.dense.apply(rest))
        return torch.cat(pieces, dim=-1)

    def matrix(self) -> torch.Tensor:
        """$P$ `(k, p_b)` as a float64 matrix (for small blocks and tests)."""
        return self.project_flat(torch.eye(self.size, dtype=torch.float64)).T
