"""The dense Hessian does not depend on how its columns are chunked."""

from __future__ import annotations

import pytest
import torch

from helpers import classification_data, make_mlp, rel_err
from influx.torch.functional import get_model_parameters, hessian


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_hessian_chunking_matches_full_hessian(chunk_size: int | None) -> None:
    net = make_mlp(d_in=4, hidden=5, d_out=3)
    x, y = classification_data(n=20, d_in=4)
    loss = torch.nn.functional.cross_entropy
    params = get_model_parameters(net)
    names = list(params)
    shapes = [p.shape for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def flat_loss(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, [s.numel() for s in shapes])
        as_dict = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss(torch.func.functional_call(net, as_dict, (x,)), y)

    expected = torch.func.hessian(flat_loss)(flat)
    result = hessian(net, loss, params, x, y, chunk_size=chunk_size)
    assert result.shape == (flat.numel(), flat.numel())
    assert rel_err(result, expected) < 1e-12
