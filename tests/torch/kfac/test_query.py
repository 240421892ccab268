"""Query batching: the test factors of Kronecker layers at low rank, the rank given or the
smallest meeting a relative Frobenius error budget."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

import torch
from helpers import classification_data, make_mlp
from influx.torch import DirectInfluence, EkfacInfluence
from influx.torch.kfac.query import low_rank_matrices, low_rank_query_factors, rank_for_error


@pytest.fixture(scope="module")
def ekfac() -> EkfacInfluence:
    net = make_mlp(d_in=5, hidden=6, d_out=3).double()
    x, y = classification_data(40)
    return EkfacInfluence(net, True, loss=F.cross_entropy, regularization=0.01).fit(
        [(x.double(), y)]
    )


def test_full_rank_is_exact(ekfac: EkfacInfluence) -> None:
    x, y = classification_data(30, seed=2)
    x_test, y_test = classification_data(4, seed=3)
    x, x_test = x.double(), x_test.double()
    factors = ekfac.influence_factors(x_test, y_test)
    full, ranks = low_rank_query_factors(ekfac, factors, rank=100)
    assert ranks == {"0": 6, "2": 3}  # min(out, in + 1) of Linear(5, 6) and Linear(6, 3)
    torch.testing.assert_close(full, factors, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        ekfac.influences_from_factors(full, x, y),
        ekfac.influences(x_test, y_test, x, y),
        rtol=1e-10,
        atol=1e-12,
    )
    exact_budget, chosen = low_rank_query_factors(ekfac, factors, error=0.0)
    torch.testing.assert_close(exact_budget, factors, rtol=1e-10, atol=1e-12)
    lower, ranks = low_rank_query_factors(ekfac, factors, rank=1)
    assert ranks == {"0": 1, "2": 1}
    first = ekfac.model[0]
    u = lower[:, : first.weight.numel()].reshape(4, 6, 5)
    assert int(torch.linalg.matrix_rank(u).max()) == 1


def test_the_error_budget_picks_the_smallest_rank_meeting_it() -> None:
    """Matrices with known singular values: the chosen rank meets the budget for every
    matrix, and one rank less misses it for at least one (errors measured on the
    reconstructions)."""
    g = torch.Generator().manual_seed(0)
    n, m, k = 5, 7, 6
    left = torch.linalg.qr(torch.randn(n, m, k, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, k, k, generator=g, dtype=torch.float64))[0]
    values = torch.rand(n, k, generator=g, dtype=torch.float64).sort(descending=True).values
    values = values * torch.logspace(0, -3, k, dtype=torch.float64)
    matrices = left @ torch.diag_embed(values) @ right.transpose(-1, -2)

    def errors(rank: int) -> torch.Tensor:
        (lo, hi), _ = low_rank_matrices(matrices, rank=rank)
        residual = torch.linalg.matrix_norm(matrices - lo @ hi.transpose(-1, -2))
        return residual / torch.linalg.matrix_norm(matrices)

    for budget in (0.5, 0.2, 0.05, 0.01, 1e-3):
        (lo, hi), rank = low_rank_matrices(matrices, error=budget)
        assert lo.shape == (n, m, rank) and hi.shape == (n, k, rank)
        assert bool((errors(rank) <= budget).all())
        assert rank == 1 or bool((errors(rank - 1) > budget).any())
    assert rank_for_error(values, 0.0) == k
    assert errors(k).max() < 1e-12


def test_query_arguments_are_checked(ekfac: EkfacInfluence) -> None:
    x_test, y_test = classification_data(2, seed=3)
    factors = ekfac.influence_factors(x_test.double(), y_test)
    with pytest.raises(ValueError, match="Pass exactly one of parameters 'rank' and 'error'"):
        low_rank_query_factors(ekfac, factors)
    with pytest.raises(ValueError, match="Pass exactly one of parameters 'rank' and 'error'"):
        low_rank_query_factors(ekfac, factors, rank=1, error=0.1)
    with pytest.raises(ValueError, match="Parameter 'rank' must be a positive int, got 0"):
        low_rank_query_factors(ekfac, factors, rank=0)
    with pytest.raises(ValueError, match=r"Parameter 'error' must be a number in \[0, 1\)"):
        low_rank_query_factors(ekfac, factors, error=1.5)
    with pytest.raises(
        ValueError, match=r"Parameter 'factors' must have shape \(N, 57\), got \(2, 5\)"
    ):
        low_rank_query_factors(ekfac, factors[:, :5], rank=1)
    net = make_mlp().double()
    x, y = classification_data(10)
    direct = DirectInfluence(net, F.cross_entropy, regularization=0.1).fit([(x.double(), y)])
    with pytest.raises(ValueError, match="has no block of one Kronecker-factored layer"):
        low_rank_query_factors(direct, direct.influence_factors(x.double(), y), rank=1)
