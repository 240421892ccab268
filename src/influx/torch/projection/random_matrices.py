r"""Random matrices of the projections, the same numbers on every machine and device: generated
on the CPU in float64 from a seed and string labels (a layer's or block's name), so that each
part of a projection has its own stream independent of the order of generation."""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

import torch

__all__ = ["orthonormal_rows", "random_matrix", "seeded_generator"]


def seeded_generator(seed: int, labels: Sequence[str]) -> torch.Generator:
    """A CPU generator seeded from `seed` and string labels, independent of the process."""
    entropy = [int(seed)] + [zlib.crc32(label.encode()) for label in labels]
    words = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    value = ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)


def random_matrix(
    rows: int, columns: int, distribution: str, seed: int, labels: Sequence[str]
) -> torch.Tensor:
    r"""A `(rows, columns)` float64 matrix with independent entries of mean 0 and variance
    $1/\text{rows}$: Gaussian, or $\pm 1/\sqrt{\text{rows}}$ (`"rademacher"`), generated on
    the CPU from `seed` and `labels` (the same numbers on every machine and device)."""
    generator = seeded_generator(seed, labels)
    if distribution == "rademacher":
        signs = torch.randint(0, 2, (rows, columns), generator=generator).to(torch.float64)
        return (2.0 * signs - 1.0) / math.sqrt(rows)
    return torch.randn(rows, columns, generator=generator, dtype=torch.float64) / math.sqrt(rows)


def orthonormal_rows(matrix: torch.Tensor) -> torch.Tensor:
    r"""The rows of `matrix` `(k, p)`, $k \le p$, made orthogonal (QR of its transpose) and
    scaled by $\sqrt{p / k}$, so that $\mathbb{E}[P^\top P] = I$ as for the random matrix; a
    square result is orthogonal."""
    q, r = torch.linalg.qr(matrix.T)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    scale = math.sqrt(matrix.shape[1] / matrix.shape[0])
    return ((q * signs).T * scale).contiguous()
