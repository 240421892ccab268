"""The dense Hessian does not depend on how its columns are chunked."""

from __future__ import annotations

import pytest

import torch
from helpers import classification_data, make_mlp, rel_err
from influx.torch.functional import get_model_parameters, hessian
from references import exact_hessian


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_hessian_chunking_matches_full_hessian(chunk_size: int | None) -> None:
    net = make_mlp(d_in=4, hidden=5, d_out=3)
    x, y = classification_data(n=20, d_in=4)
    loss = torch.nn.functional.cross_entropy
    params = get_model_parameters(net)
    expected = exact_hessian(net, loss, params, x, y)
    result = hessian(net, loss, params, x, y, chunk_size=chunk_size)
    assert result.shape == expected.shape == (sum(p.numel() for p in params.values()),) * 2
    assert rel_err(result, expected) < 1e-12
