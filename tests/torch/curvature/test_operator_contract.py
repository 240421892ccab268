"""The contract every operator class passes, curvature and inverse alike.

For each operator: `apply` on a vector and on rows keeps shape and dtype; it agrees with its
dense matrix (a closed form or `torch.func`, float64); `with_regularization` equals a fresh
operator; `to(device)` returns the operator unchanged in value; exporting the state and
restoring it gives bit-identical results; so does a cloudpickle round trip.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import cloudpickle
import pytest
from torch.func import functional_call, hessian, jacrev, vmap

import torch
from helpers import classification_data, loader, make_mlp
from influx.torch import (
    CgOperator,
    DirectSolveOperator,
    EkfacPreconditioner,
    GaussNewtonOperator,
    GeneralizedGaussNewtonOperator,
    HessianOperator,
    IdentityOperator,
    InverseHarmonicMeanOperator,
    JacobiPreconditioner,
    KroneckerCurvature,
    KroneckerFactoredOperator,
    LissaOperator,
    LowRankOperator,
    LowRankProductRepresentation,
    MatrixOperator,
    NystroemPreconditioner,
    ShiftedOperator,
)
from influx.torch.curvature.batch_operation import GaussNewtonBatchOperation, HessianBatchOperation
from influx.torch.curvature.operators import PrecomputedGaussNewtonOperator
from influx.torch.curvature.tensor_operator import TensorOperator
from influx.torch.data.state import StateContext, restore_operator
from influx.torch.functional import get_model_parameters

F = torch.nn.functional
LAMBDA, OTHER_LAMBDA = 0.05, 0.2


class Problem:
    """A small float64 MLP on classification data, with its curvatures in closed form."""

    def __init__(self) -> None:
        self.x, self.y = classification_data(n=40)
        self.net = make_mlp()
        self.data = loader(self.x, self.y, batch_size=16)
        self.params = get_model_parameters(self.net)
        self.names = list(self.params)
        self.sizes = [p.numel() for p in self.params.values()]
        self.context = StateContext(self.net, F.cross_entropy, self.params, self.data, "model")

    def _unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {n: t.reshape(self.params[n].shape) for n, t in zip(self.names, parts)}

    def _loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.net, self._unflatten(flat), (x,)), y)

    @property
    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params.values()])

    def hessian(self) -> torch.Tensor:
        return hessian(self._loss)(self.flat, self.x, self.y)

    def per_sample_grads(self) -> torch.Tensor:
        one = jacrev(lambda f, x, y: self._loss(f, x[None], y[None]))
        return vmap(one, in_dims=(None, 0, 0))(self.flat, self.x, self.y)

    def generalized_gauss_newton(self) -> torch.Tensor:
        r"""$\frac{1}{n}\sum_i J_i^\top (\mathrm{diag}(p_i) - p_i p_i^\top) J_i$ for the
        cross-entropy, with $J_i$ the Jacobian of the logits (`jacrev`)."""

        def logits(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.net, self._unflatten(flat), (x[None],))[0]

        jac = vmap(jacrev(logits), in_dims=(None, 0))(self.flat, self.x)  # (n, C, P)
        with torch.no_grad():
            probs = torch.softmax(self.net(self.x), dim=1)
        h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / self.x.shape[0]

    def gauss_newton(self) -> torch.Tensor:
        g = self.per_sample_grads()
        return g.T @ g / g.shape[0]


@pytest.fixture(scope="module")
def problem() -> Problem:
    torch.manual_seed(0)
    return Problem()


def _inverse(matrix: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.linalg.inv(matrix + lam * torch.eye(matrix.shape[0]))


Case = Callable[[Problem, Optional[float]], Tuple[TensorOperator, Optional[torch.Tensor], float]]


def _kfac_layer_net() -> Tuple[torch.nn.Module, torch.utils.data.DataLoader]:
    torch.manual_seed(1)
    net = torch.nn.Linear(5, 3)
    x, y = classification_data(n=40)
    return net, loader(x, y)


def _kfac_curvature(p: Problem):  # type: ignore[no-untyped-def]
    net, data = _kfac_layer_net()
    curvature = KroneckerCurvature(update_diagonal=True)
    blocks = curvature.blocks(net, None)  # type: ignore[arg-type]
    return curvature.fit(net, F.cross_entropy, data, blocks)["model"]


def _low_rank(p: Problem, rank: int) -> LowRankProductRepresentation:
    evals, evecs = torch.linalg.eigh(p.gauss_newton())
    return LowRankProductRepresentation(evals[-rank:], evecs[:, -rank:])


def _ihm_reference(p: Problem, lam: float) -> torch.Tensor:
    g = p.per_sample_grads()
    eye = torch.eye(g.shape[1])
    return torch.stack([torch.linalg.inv(torch.outer(gi, gi) + lam * eye) for gi in g]).mean(0)


SPD = torch.randn(7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
SPD = SPD @ SPD.T + torch.eye(7, dtype=torch.float64)

CASES: Dict[str, Case] = {
    "matrix": lambda p, lam: (MatrixOperator(SPD), SPD, 1e-14),
    "identity": lambda p, lam: (IdentityOperator(7, torch.float64, "cpu"), torch.eye(7), 1e-15),
    "shifted": lambda p, lam: (
        ShiftedOperator(MatrixOperator(SPD), lam),
        SPD + (lam or 0.0) * torch.eye(7),
        1e-14,
    ),
    "hessian": lambda p, lam: (
        HessianOperator(p.net, F.cross_entropy, p.data),
        p.hessian(),
        1e-10,
    ),
    "gauss_newton": lambda p, lam: (
        GaussNewtonOperator(p.net, F.cross_entropy, p.data),
        p.gauss_newton(),
        1e-10,
    ),
    "generalized_gauss_newton": lambda p, lam: (
        GeneralizedGaussNewtonOperator(p.net, F.cross_entropy, p.data),
        p.generalized_gauss_newton(),
        1e-10,
    ),
    "cg_ekfac": lambda p, lam: (
        CgOperator(
            GeneralizedGaussNewtonOperator(p.net, F.cross_entropy, p.data),
            lam,
            rtol=1e-13,
            atol=0.0,
            preconditioner=EkfacPreconditioner(seed=0),
        ),
        _inverse(p.generalized_gauss_newton(), lam or 0.0),
        1e-9,
    ),
    "precomputed_gauss_newton": lambda p, lam: (
        PrecomputedGaussNewtonOperator(GaussNewtonBatchOperation(p.net, F.cross_entropy), p.data),
        p.gauss_newton(),
        1e-10,
    ),
    "kronecker_curvature": lambda p, lam: (
        (op := _kfac_curvature(p)),
        op.curvature_matrix(),  # type: ignore[attr-defined]
        1e-12,
    ),
    "direct": lambda p, lam: (
        DirectSolveOperator(p.hessian(), lam),
        _inverse(p.hessian(), lam or 0.0),
        1e-10,
    ),
    "cg": lambda p, lam: (
        # H + 0.05 I of this network is indefinite: CG stops there, so the Gauss-Newton
        CgOperator(GaussNewtonOperator(p.net, F.cross_entropy, p.data), lam, rtol=1e-13, atol=0.0),
        _inverse(p.gauss_newton(), lam or 0.0),
        1e-9,
    ),
    "cg_jacobi": lambda p, lam: (
        CgOperator(
            GaussNewtonOperator(p.net, F.cross_entropy, p.data),
            lam,
            rtol=1e-13,
            atol=0.0,
            preconditioner=JacobiPreconditioner(num_samples_estimator=4),
        ),
        _inverse(p.gauss_newton(), lam or 0.0),
        1e-9,
    ),
    "cg_nystroem": lambda p, lam: (
        CgOperator(
            GaussNewtonOperator(p.net, F.cross_entropy, p.data),
            lam,
            rtol=1e-13,
            atol=0.0,
            preconditioner=NystroemPreconditioner(rank=5),
        ),
        _inverse(p.gauss_newton(), lam or 0.0),
        1e-9,
    ),
    "lissa": lambda p, lam: (
        LissaOperator(
            HessianBatchOperation(p.net, F.cross_entropy), p.data, lam, maxiter=30, scale=20.0
        ),
        None,
        0.0,
    ),
    "low_rank_woodbury": lambda p, lam: (
        LowRankOperator(_low_rank(p, 57), lam, exact=True),
        _inverse(p.gauss_newton(), lam or 0.0),
        1e-9,
    ),
    "low_rank_projected": lambda p, lam: (
        LowRankOperator(_low_rank(p, 8), lam, exact=False),
        (lambda r: r.projections @ torch.diag(1 / (r.eigen_vals + (lam or 0.0))) @ r.projections.T)(
            _low_rank(p, 8)
        ),
        1e-10,
    ),
    "inverse_harmonic_mean": lambda p, lam: (
        InverseHarmonicMeanOperator(p.net, F.cross_entropy, p.data, lam),  # type: ignore[arg-type]
        _ihm_reference(p, lam),  # type: ignore[arg-type]
        1e-10,
    ),
    "kronecker_inverse": lambda p, lam: (
        KroneckerFactoredOperator.from_curvature(_kfac_curvature(p), lam),
        _inverse(_kfac_curvature(p).curvature_matrix(), lam or 0.0),
        1e-10,
    ),
}

WITHOUT_REGULARIZATION = {
    "identity",
    "matrix",
    "generalized_gauss_newton",
    "hessian",
    "gauss_newton",
    "precomputed_gauss_newton",
    "kronecker_curvature",
}


def _build(name: str, p: Problem, lam: Optional[float] = LAMBDA):
    torch.manual_seed(0)
    return CASES[name](p, lam)


@pytest.mark.parametrize("name", sorted(CASES))
def test_apply_shapes_and_dense_agreement(name: str, problem: Problem) -> None:
    op, dense, tol = _build(name, problem)
    size = op.input_size
    rows = torch.randn(4, size, generator=torch.Generator().manual_seed(5))
    out = op.apply(rows)
    assert out.shape == (4, size) and out.dtype == torch.float64
    single = op.apply(rows[0])
    assert single.shape == (size,) and single.dtype == torch.float64
    if dense is not None:
        expected = rows @ dense.T
        assert float(torch.linalg.norm(out - expected) / torch.linalg.norm(expected)) < tol
        assert torch.allclose(single, out[0], rtol=1e-12, atol=1e-12 * float(out.abs().max()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_with_regularization_equals_fresh_operator(name: str, problem: Problem) -> None:
    op, _, _ = _build(name, problem)
    if name in WITHOUT_REGULARIZATION:
        with pytest.raises(NotImplementedError, match="has no regularization"):
            op.with_regularization(OTHER_LAMBDA)
        return
    rows = torch.randn(3, op.input_size, generator=torch.Generator().manual_seed(6))
    changed = op.with_regularization(OTHER_LAMBDA)
    fresh, _, _ = _build(name, problem, OTHER_LAMBDA)
    assert changed.regularization == OTHER_LAMBDA and op.regularization == LAMBDA
    expected = fresh.apply(rows)
    assert torch.allclose(changed.apply(rows), expected, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_to_device_returns_the_operator(name: str, problem: Problem) -> None:
    op, _, _ = _build(name, problem)
    rows = torch.randn(2, op.input_size, generator=torch.Generator().manual_seed(7))
    fresh, _, _ = _build(name, problem)
    assert op.to("cpu") is op
    assert op.device == torch.device("cpu")
    assert torch.equal(op.apply(rows), fresh.apply(rows))
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        moved = op.to("cuda")
        assert torch.allclose(moved.apply(rows.cuda()).cpu(), fresh.apply(rows))


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_round_trip_and_pickle_are_bit_identical(name: str, problem: Problem) -> None:
    op, _, _ = _build(name, problem)
    state = op.export_state()
    flat, spec = state.flatten()
    assert all(isinstance(t, torch.Tensor) for t in flat.values())
    restored = restore_operator(type(state).unflatten(spec, flat), problem.context)
    pickled = cloudpickle.loads(cloudpickle.dumps(op))
    assert type(restored) is type(op)
    rows = torch.randn(3, op.input_size, generator=torch.Generator().manual_seed(8))
    expected = op.apply(rows)
    assert torch.equal(restored.apply(rows), expected)
    assert torch.equal(pickled.apply(rows), expected)


def test_unknown_operator_class_is_rejected(problem: Problem) -> None:
    state = MatrixOperator(SPD).export_state()
    state.cls = "os.system"
    with pytest.raises(ValueError, match="Unknown operator class 'os.system'"):
        restore_operator(state, problem.context)
