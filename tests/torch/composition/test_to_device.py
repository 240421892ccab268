"""`to(device)` returns the moved object and leaves every result unchanged.

On CPU the move is to the same device; with CUDA available the same checks run after a move
to the GPU (skipped otherwise).
"""

from __future__ import annotations

from typing import Any, Callable, List

import pytest
import torch.nn.functional as F

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    JacobiPreconditioner,
    LissaInfluence,
    NystroemPreconditioner,
    NystroemSketchInfluence,
)
from influx.torch.curvature.batch_operation import GaussNewtonBatchOperation, HessianBatchOperation
from influx.torch.data.batches import TorchBatch
from influx.torch.functional import LowRankProductRepresentation
from influx.torch.gradients.provider import TorchGradientProvider
from influx.torch.inverse.cg import CgOperator
from influx.torch.inverse.inverse_harmonic_mean import InverseHarmonicMeanBatchOperation
from influx.torch.operator import DirectSolveOperator, HessianOperator, MatrixOperator

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
if not torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", marks=pytest.mark.skip(reason="CUDA is not available")))

MODELS: List[Callable[[torch.nn.Module], Any]] = [
    lambda net: DirectInfluence(net, F.cross_entropy, 0.1, block_structure=BlockMode.LAYER_WISE),
    lambda net: CgInfluence(net, F.cross_entropy, 0.1, preconditioner=NystroemPreconditioner(5)),
    lambda net: CgInfluence(net, F.cross_entropy, 0.1, preconditioner=JacobiPreconditioner()),
    lambda net: LissaInfluence(net, F.cross_entropy, 0.1, maxiter=20),
    lambda net: ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=5),
    lambda net: NystroemSketchInfluence(net, F.cross_entropy, 0.1, rank=5),
    lambda net: InverseHarmonicMeanInfluence(net, F.cross_entropy, 0.1),
    lambda net: EkfacInfluence(net, hessian_regularization=0.1),
]


@pytest.fixture
def data():
    x, y = classification_data(n=30)
    return x, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factory", MODELS, ids=lambda f: "model")
def test_influence_models(factory, device, data) -> None:
    x, y = data
    reference = factory(make_mlp()).fit(loader(x, y, 10)).influences(x[:4], y[:4], x, y).detach()
    before_fit = factory(make_mlp())
    assert before_fit.to(device) is before_fit
    moved_before = before_fit.fit(loader(x, y, 10)).influences(x[:4], y[:4], x, y)
    fitted = factory(make_mlp()).fit(loader(x, y, 10))
    assert fitted.to(device) is fitted
    moved_after = fitted.influences(x[:4], y[:4], x, y)
    assert moved_before.device.type == device and moved_after.device.type == device
    assert rel_err(moved_before.cpu(), reference) < 1e-8
    assert rel_err(moved_after.cpu(), reference) < 1e-8


@pytest.mark.parametrize("device", DEVICES)
def test_operators_batch_operations_and_providers(device, data) -> None:
    x, y = data
    batch = TorchBatch(x, y)
    rows = torch.randn(3, sum(p.numel() for p in make_mlp().parameters()))
    objects: List[Callable[[], Any]] = [
        lambda: HessianOperator(make_mlp(), F.cross_entropy, loader(x, y, 10)),
        lambda: CgOperator(
            HessianOperator(make_mlp(), F.cross_entropy, loader(x, y, 10)),
            0.1,
            preconditioner=JacobiPreconditioner(),
        ),
        lambda: DirectSolveOperator(torch.eye(rows.shape[1]) * 2, 0.1),
        lambda: MatrixOperator(torch.eye(rows.shape[1]) * 3),
    ]
    for make in objects:
        expected = make().apply(rows)
        op = make()
        assert op.to(device) is op
        assert op.device.type == device
        assert rel_err(op.apply(rows.to(device)).cpu(), expected) < 1e-10
        form = op.as_bilinear_form()
        assert form.to(device) is form

    for make_op in (
        lambda: HessianBatchOperation(make_mlp(), F.cross_entropy),
        lambda: GaussNewtonBatchOperation(make_mlp(), F.cross_entropy),
        lambda: InverseHarmonicMeanBatchOperation(make_mlp(), F.cross_entropy, 0.1),
    ):
        expected = make_op().apply(batch, rows)
        batch_op = make_op()
        assert batch_op.to(device) is batch_op
        assert rel_err(batch_op.apply(batch.to(device), rows.to(device)).cpu(), expected) < 1e-10

    expected = TorchGradientProvider(make_mlp(), F.cross_entropy).flat_grads(batch)
    provider = TorchGradientProvider(make_mlp(), F.cross_entropy)
    assert provider.to(device) is provider and provider.device.type == device
    assert rel_err(provider.flat_grads(batch.to(device)).cpu(), expected) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_block_mapper_composition_and_low_rank_representation(device, data) -> None:
    x, y = data
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.1, BlockMode.LAYER_WISE)
    model.fit(loader(x, y, 10))
    expected = model.influence_factors(x[:3], y[:3])
    mapper = model.block_mapper
    assert mapper.to(device) is mapper
    for block in mapper.composable_block_dict.values():
        assert block.to(device) is block and block.op.device.type == device
    assert rel_err(model.influence_factors(x[:3], y[:3]).cpu(), expected) < 1e-10

    rep = LowRankProductRepresentation(torch.ones(2), torch.eye(4)[:, :2])
    moved = rep.to(device)
    assert isinstance(moved, LowRankProductRepresentation) and moved.device.type == device
    assert torch.equal(moved.projections.cpu(), rep.projections)
