"""Guards against silent wrong answers: every case reproduces what used to return a plausible
but meaningless result and asserts the error (by message) or the corrected result."""

from __future__ import annotations

import copy
import logging

import pytest
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.calculator import SequentialInfluenceCalculator
from influx.errors import (
    InfluxError,
    NonConvergenceError,
    NonFiniteCurvatureError,
    UnorderedDataError,
)
from influx.torch import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    rank_training_points,
    top_k_influences,
)
from influx.torch.composition.curvatures import KroneckerCurvature
from influx.torch.curvature.operators import SecondOrderMode
from influx.torch.curvature.tensor_operator import MatrixOperator
from influx.torch.inverse.direct import DirectSolveOperator
from influx.torch.inverse.lissa import LissaDivergenceError
from influx.torch.inverse.preconditioner import JacobiPreconditioner, NystroemPreconditioner
from references import exact_hessian


@pytest.fixture
def problem() -> tuple:
    x, y = classification_data(n=48)
    return make_mlp().eval(), x, y


def shuffled(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


# --- order-sensitive calls refuse shuffled loaders ------------------------------------------


def test_shuffled_loader_is_refused_where_indices_are_returned(problem) -> None:
    net, x, y = problem
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    message = r"'train_data' is a data loader with a RandomSampler \(shuffle=True\)"
    with pytest.raises(UnorderedDataError, match=message):
        rank_training_points(model, shuffled(x, y), loader(x[:8], y[:8]))
    with pytest.raises(UnorderedDataError, match=message):
        top_k_influences(model, x[:3], y[:3], shuffled(x, y), k=2)
    calculator = SequentialInfluenceCalculator(model)
    with pytest.raises(UnorderedDataError, match="'train_data_iterable' is a data loader"):
        calculator.influences(loader(x[:4], y[:4]), shuffled(x, y))
    with pytest.raises(UnorderedDataError, match="'data_iterable' is a data loader"):
        calculator.self_influences(shuffled(x, y))
    assert issubclass(UnorderedDataError, InfluxError)
    # ordered loaders and plain lists of batches are accepted
    ranking = rank_training_points(model, loader(x, y), [(x[:8], y[:8])])
    assert ranking.values.shape == (48,)


def test_drop_last_loader_is_refused_where_indices_matter(problem) -> None:
    """`drop_last=True` used to rank 96 of 100 points and write 256 of 300 columns."""
    net, x, y = problem  # 48 points
    dropping = DataLoader(TensorDataset(x, y), batch_size=20, drop_last=True)
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(dropping)  # fit accepts it
    message = (
        r"'train_data' is a data loader with drop_last=True \(batch_size 20\): it leaves "
        r"out the last 8 of 48 samples"
    )
    with pytest.raises(UnorderedDataError, match=message):
        rank_training_points(model, dropping, loader(x[:8], y[:8]))
    with pytest.raises(UnorderedDataError, match=message):
        top_k_influences(model, x[:3], y[:3], dropping, k=2)
    calculator = SequentialInfluenceCalculator(model)
    with pytest.raises(UnorderedDataError, match="'train_data_iterable' .* drop_last=True"):
        calculator.influences(loader(x[:4], y[:4]), dropping)
    with pytest.raises(UnorderedDataError, match="'test_data_iterable' .* drop_last=True"):
        calculator.influences(dropping, loader(x, y))

    # an iterable dataset's size is unknown: the message says it may drop samples
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    stream = DataLoader(Stream(), batch_size=20, drop_last=True)
    with pytest.raises(UnorderedDataError, match=r"may leave out the last samples \(the dataset"):
        rank_training_points(model, stream, loader(x[:8], y[:8]))
    # nothing is dropped when the batch size divides the dataset
    exact = DataLoader(TensorDataset(x, y), batch_size=16, drop_last=True)
    assert rank_training_points(model, exact, loader(x[:8], y[:8])).values.shape == (48,)


def test_shuffled_loader_to_fit_gives_the_same_influences(problem) -> None:
    net, x, y = problem
    ordered = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    torch.manual_seed(3)
    mixed = DirectInfluence(net, F.cross_entropy, 0.1).fit(shuffled(x, y))
    torch.testing.assert_close(
        mixed.influences(x[:5], y[:5], x, y),
        ordered.influences(x[:5], y[:5], x, y),
        rtol=1e-10,
        atol=1e-12,
    )


# --- finite curvature or an error --------------------------------------------------------------


def test_nan_in_training_data_names_block_and_batch(problem) -> None:
    net, x, y = problem
    bad = x.clone()
    bad[20, 1] = float("nan")  # batch 1 of 16
    with pytest.raises(
        NonFiniteCurvatureError,
        match=r"block 'model' is not finite .*batch 1 of 'data' is the first with NaN or Inf "
        r"in its inputs",
    ):
        DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(bad, y))


def test_nan_in_precomputed_gradients_is_found_in_the_fitted_state(problem) -> None:
    net, x, y = problem
    bad = x.clone()
    bad[40, 0] = float("inf")  # batch 2
    model = CgInfluence(
        net,
        F.cross_entropy,
        0.1,
        precompute_grad=True,
        second_order_mode=SecondOrderMode.GAUSS_NEWTON,
    )
    with pytest.raises(
        NonFiniteCurvatureError, match=r"NaN or Inf in operator/grads.*batch 2 of 'data'"
    ):
        model.fit(loader(bad, y))


def test_direct_solve_of_a_non_finite_matrix_names_the_cause() -> None:
    matrix = torch.eye(3)
    matrix[1, 2] = float("nan")
    with pytest.raises(NonFiniteCurvatureError, match="holds NaN or Inf.*no regularization"):
        DirectSolveOperator(matrix, 0.1)


def test_nan_parameters_are_named(problem) -> None:
    net, x, y = problem
    with torch.no_grad():
        net[0].bias[1] = float("nan")
    with pytest.raises(NonFiniteCurvatureError, match=r"NaN or Inf in its parameters \['0.bias'\]"):
        DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))


# --- per-sample consistency --------------------------------------------------------------------


def test_loss_coupling_the_samples_of_a_batch_is_refused(problem) -> None:
    net, x, _ = problem
    target = torch.randn(48, 3)

    def centred(prediction: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction - prediction.mean(dim=0), y)

    with pytest.raises(ValueError, match="couples the samples of a batch"):
        DirectInfluence(net, centred, 0.1).fit(loader(x, target))
    summed = lambda p, y: F.mse_loss(p, y, reduction="sum")  # noqa: E731
    with pytest.raises(ValueError, match="sum of the per-sample losses: use reduction='mean'"):
        DirectInfluence(net, summed, 0.1).fit(loader(x, target))


# --- train mode --------------------------------------------------------------------------------


def test_dropout_or_batch_norm_in_training_mode_is_refused(problem) -> None:
    _, x, y = problem
    dropout = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.Dropout(0.2), torch.nn.Linear(4, 3)
    )
    with pytest.raises(ValueError, match=r"training mode .*1 \(Dropout\).*Call model.eval\(\)"):
        CgInfluence(dropout, F.cross_entropy, 0.1).fit(loader(x, y))
    batch_norm = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)
    )
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*Call model.eval\(\)"):
        DirectInfluence(batch_norm, F.cross_entropy, 0.1).fit(loader(x, y))
    DirectInfluence(batch_norm.eval(), F.cross_entropy, 0.1).fit(loader(x, y))


class _Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_deterministic_model_in_training_mode_warns_for_custom_modules(problem, caplog) -> None:
    _, x, y = problem
    net = torch.nn.Sequential(torch.nn.Linear(5, 3), _Scale()).train()
    with caplog.at_level(logging.WARNING, logger="influx"):
        DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    assert any("training mode" in r.getMessage() for r in caplog.records)


# --- EK-FAC argument trap ----------------------------------------------------------------------


def test_ekfac_loss_as_second_positional_argument_is_a_type_error(problem) -> None:
    net, _, _ = problem
    with pytest.raises(TypeError, match=r"pass the loss by keyword \(loss=...\)"):
        EkfacInfluence(net, F.mse_loss, regularization=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"pass the loss by keyword \(loss=...\)"):
        KroneckerCurvature(update_diagonal=F.mse_loss)  # type: ignore[arg-type]


# --- convergence policy ------------------------------------------------------------------------


def test_cg_nonconvergence_raises_with_diagnostics(problem) -> None:
    net, x, y = problem
    model = CgInfluence(net, F.cross_entropy, 0.5, maxiter=2, on_nonconvergence="raise").fit(
        loader(x, y)
    )
    with pytest.raises(NonConvergenceError, match="CG did not converge") as info:
        model.influence_factors(x[:3], y[:3])
    assert isinstance(info.value, InfluxError)
    assert info.value.diagnostics.method == "cg"
    assert not info.value.diagnostics.converged and info.value.diagnostics.iterations == 2
    with pytest.raises(ValueError, match="'on_nonconvergence' must be one of"):
        CgInfluence(net, F.cross_entropy, 0.1, on_nonconvergence="ignore")


def test_lissa_nonconvergence_raises(problem) -> None:
    net, x, y = problem
    model = LissaInfluence(
        net,
        F.cross_entropy,
        0.5,
        maxiter=3,
        second_order_mode=SecondOrderMode.GAUSS_NEWTON,
        on_nonconvergence="raise",
    ).fit(loader(x, y))
    with pytest.raises(NonConvergenceError, match="LiSSA did not converge") as info:
        model.influence_factors(x[:3], y[:3])
    assert info.value.diagnostics.method == "lissa"


def test_arnoldi_nonconvergence_raises(problem) -> None:
    net, x, y = problem
    model = ArnoldiInfluence(
        net, F.cross_entropy, 0.1, rank=8, tol=1e-14, max_iter=1, on_nonconvergence="raise"
    )
    with pytest.raises(NonConvergenceError, match="Lanczos did not converge") as info:
        model.fit(loader(x, y))
    assert not info.value.diagnostics.converged


def test_ranking_reports_nonconvergence(problem) -> None:
    net, x, y = problem
    model = CgInfluence(net, F.cross_entropy, 1e-3, maxiter=2).fit(loader(x, y))
    ranking = rank_training_points(model, loader(x, y), loader(x[:8], y[:8]))
    assert not ranking.converged
    assert not ranking.solver_diagnostics["model"].converged
    exact = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    good = rank_training_points(exact, loader(x, y), loader(x[:8], y[:8]))
    assert good.converged


# --- LiSSA diagnosis ---------------------------------------------------------------------------


def test_lissa_divergence_names_negative_curvature(problem) -> None:
    net, x, y = problem
    data = loader(x, y)
    params = dict(net.named_parameters())
    batch_hessians = []
    for index, (xb, yb) in enumerate(data):
        if index < 3:
            h = exact_hessian(net, F.cross_entropy, params, xb, yb)
            batch_hessians.append(float(torch.linalg.eigvalsh(h)[0]))
    smallest = min(batch_hessians)
    assert smallest < -1e-3  # the Hessian of the network is indefinite
    lam = 1e-4
    model = LissaInfluence(net, F.cross_entropy, lam, scale="auto", seed=0).fit(data)
    with pytest.raises(
        LissaDivergenceError,
        match=r"negative eigenvalues .*GAUSS_NEWTON.*regularization larger than",
    ) as info:
        model.influence_factors(x[:3], y[:3])
    # a few Lanczos steps find the smallest eigenvalue of the regularized batch curvatures
    assert info.value.smallest_eigenvalue == pytest.approx(smallest + lam, rel=0.05)


# --- low-precision models ----------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_copy_matches_float32(half: torch.dtype) -> None:
    x, y = classification_data(n=48)
    x = x.float()
    net = make_mlp().float().eval()
    low = copy.deepcopy(net).to(half)
    low_x = x.to(half)
    rounded = copy.deepcopy(low).float()  # the same (rounded) parameters in float32
    # lambda = 1 keeps (H + lambda I) well conditioned: with a nearly singular matrix the
    # rounding of the parameters alone changes the influences by more than 1e-2
    cases = {
        "direct": lambda m: DirectInfluence(m, F.cross_entropy, 1.0),
        "cg": lambda m: CgInfluence(m, F.cross_entropy, 1.0),
        "ekfac": lambda m: EkfacInfluence(
            m, update_diagonal=True, loss=F.cross_entropy, regularization=1.0
        ),
    }
    for name, make in cases.items():
        reference = make(net).fit(loader(x, y)).influences(x[:6], y[:6], x, y)
        model = make(low)
        assert model.compute_dtype == torch.float32 and model.original_model is low
        values = model.fit(loader(low_x, y)).influences(low_x[:6], y[:6], low_x, y)
        assert values.dtype == torch.float32
        assert rel_err(values, reference) < 1e-2, name
        # the computation adds no error of its own beyond float32 rounding
        low_data = low_x.float()
        same = make(rounded).fit(loader(low_data, y))
        exact = same.influences(low_data[:6], y[:6], low_data, y)
        assert rel_err(values, exact) < 1e-5, name


def test_compute_dtype_argument() -> None:
    net = make_mlp()
    assert DirectInfluence(net, F.cross_entropy, 0.1).compute_dtype == torch.float64
    model = DirectInfluence(net.float(), F.cross_entropy, 0.1, compute_dtype=torch.float64)
    assert model.dtype == torch.float64
    with pytest.raises(ValueError, match="'compute_dtype' must be float32 or float64"):
        DirectInfluence(net, F.cross_entropy, 0.1, compute_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="'compute_dtype' must be a floating torch.dtype"):
        DirectInfluence(net, F.cross_entropy, 0.1, compute_dtype="float32")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float32 or float64 to be factorised"):
        DirectSolveOperator(torch.eye(3, dtype=torch.bfloat16))


def test_cg_tolerance_defaults_to_what_the_dtype_can_reach() -> None:
    matrix = torch.eye(4)
    assert MatrixOperator(matrix).dtype == torch.float64
    from influx.torch.inverse.cg import CgOperator

    assert CgOperator(MatrixOperator(matrix)).rtol == 1e-7
    single = CgOperator(MatrixOperator(matrix.float()))
    assert single.rtol == pytest.approx(10 * torch.finfo(torch.float32).eps)
    assert CgOperator(MatrixOperator(matrix.float()), rtol=1e-3).rtol == 1e-3


# --- seeds -------------------------------------------------------------------------------------


def test_seeded_randomized_methods_are_bit_identical(problem) -> None:
    net, x, y = problem
    data = loader(x, y)
    for make in (
        lambda s: NystroemSketchInfluence(net, F.cross_entropy, 0.1, rank=6, seed=s),
        lambda s: ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=6, seed=s),
        lambda s: CgInfluence(
            net, F.cross_entropy, 0.1, preconditioner=JacobiPreconditioner(2, seed=s)
        ),
        lambda s: CgInfluence(
            net, F.cross_entropy, 0.1, preconditioner=NystroemPreconditioner(4, seed=s)
        ),
        lambda s: EkfacInfluence(
            net, loss=F.cross_entropy, regularization=0.1, fisher="sampled", seed=s
        ),
    ):
        first = make(7).fit(data).influence_factors(x[:3], y[:3])
        torch.manual_seed(123)  # the global random state does not matter
        second = make(7).fit(data).influence_factors(x[:3], y[:3])
        assert torch.equal(first, second)
    scales = [
        LissaInfluence(net, F.cross_entropy, 0.1, scale="auto", seed=5)
        .fit(data)
        .block_mapper.composable_block_dict["model"]
        .op.scale
        for _ in range(2)
    ]
    assert scales[0] == scales[1]
    with pytest.raises(TypeError, match="'seed' must be an int or None"):
        JacobiPreconditioner(seed=1.5)  # type: ignore[arg-type]


# --- clear errors at the API boundary ----------------------------------------------------------


def test_shape_mismatch_with_the_first_layer_is_named(problem) -> None:
    net, x, y = problem
    with pytest.raises(
        ValueError,
        match=r"first batch of 'data' \(x with shape \(16, 4\).*first layer '0' is Linear with "
        r"in_features=5",
    ):
        DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x[:, :4], y))


def test_float_labels_for_cross_entropy_are_refused(problem) -> None:
    net, x, y = problem
    with pytest.raises(TypeError, match="'data' must hold class indices of dtype torch.int64"):
        DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y.double()))
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    with pytest.raises(TypeError, match=r"'y' must hold class indices .*y.long\(\)"):
        model.influences(x[:3], y[:3].double())


def test_dtype_mismatch_between_model_and_data_is_named(problem) -> None:
    net, x, y = problem
    with pytest.raises(
        TypeError, match="'data' must have the model's dtype torch.float64, got torch.float32"
    ):
        DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x.float(), y))
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    with pytest.raises(TypeError, match="'x' must have the model's dtype torch.float64"):
        model.influence_factors(x[:3].float(), y[:3])


# --- progress bars -----------------------------------------------------------------------------


def test_progress_bars_of_dense_curvature_and_sketch(problem, capsys) -> None:
    net, x, y = problem
    DirectInfluence(net, F.cross_entropy, 0.1, progress=True).fit(loader(x, y))
    assert "curvature" in capsys.readouterr().err
    NystroemSketchInfluence(net, F.cross_entropy, 0.1, rank=4, progress=True).fit(loader(x, y))
    assert "batches" in capsys.readouterr().err
    DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    assert capsys.readouterr().err == ""
