"""Bad input is rejected with a message naming the parameter, the expectation and the value."""

from __future__ import annotations

import math

import pytest

import torch
from helpers import classification_data, loader, make_mlp
from influx import InfluenceMode, NotFittedException, UnsupportedInfluenceModeException
from influx.torch import (
    BlockMode,
    DirectInfluence,
    DirectSolveOperator,
    MatrixOperator,
    SecondOrderMode,
    TorchBatch,
    TorchGradientProvider,
)

F = torch.nn.functional


@pytest.fixture
def fitted() -> tuple:
    x, y = classification_data()
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.1, BlockMode.LAYER_WISE)
    return model.fit(loader(x, y)), x, y


def test_mismatched_batch_sizes(fitted) -> None:
    model, x, y = fitted
    with pytest.raises(
        ValueError, match=r"'x' and 'y' must have the same number of samples.*\(5, 5\).*\(4,\)"
    ):
        model.influences(x[:5], y[:4])
    with pytest.raises(ValueError, match="same number of samples"):
        TorchBatch(x[:3], y[:2])


def test_x_without_y(fitted) -> None:
    model, x, y = fitted
    with pytest.raises(ValueError, match="Parameter 'y' is required when 'x' is given"):
        model.influences(x[:2], y[:2], x)
    with pytest.raises(ValueError, match="Parameter 'x' is required when 'y' is given"):
        model.influences(x[:2], y[:2], None, y)


def test_operator_input_size() -> None:
    op = DirectSolveOperator(torch.eye(4) * 2.0)
    with pytest.raises(ValueError, match=r"'tensor' must have shape \(4,\) or \(N, 4\).*\(3, 5\)"):
        op.apply(torch.ones(3, 5))
    with pytest.raises(ValueError, match="'matrix' must be a square matrix"):
        MatrixOperator(torch.ones(2, 3))


def test_operator_dict_structure(fitted) -> None:
    model, x, y = fitted
    from influx.torch import HessianOperator

    h = HessianOperator(model.model, F.cross_entropy, loader(x, y))
    good = {k: torch.zeros(2, *s) for k, s in h.input_dict_structure.items()}
    assert set(h.apply_to_dict(good)) == set(good)
    bad_keys = dict(list(good.items())[:2])
    with pytest.raises(ValueError, match=r"'mat' must be a dict with keys \['0.weight'"):
        h.apply_to_dict(bad_keys)
    bad_shape = dict(good, **{"0.bias": torch.zeros(2, 7)})
    with pytest.raises(ValueError, match=r"entry '0.bias' must have shape \(N, \*\(6,\)\)"):
        h.apply_to_dict(bad_shape)


def test_factors_shape_and_block_keys(fitted) -> None:
    model, x, y = fitted
    with pytest.raises(
        ValueError, match=rf"'z_test_factors' must have shape \(N, {model.n_parameters}\)"
    ):
        model.influences_from_factors(torch.ones(2, 3), x, y)
    factors = model.influence_factors_by_block(x[:2], y[:2])
    factors.pop("2")
    with pytest.raises(ValueError, match=r"keyed by the blocks \['0', '2'\], got keys \['0'\]"):
        model.influences_from_factors_by_block(factors, x, y)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf])
def test_negative_or_non_finite_regularization(value: float) -> None:
    with pytest.raises(
        ValueError, match=rf"'regularization' must be a non-negative number, got {value}"
    ):
        DirectInfluence(make_mlp(), F.cross_entropy, value)
    with pytest.raises(ValueError, match=r"'regularization\['2'\]' must be a non-negative"):
        DirectInfluence(make_mlp(), F.cross_entropy, {"2": value}, BlockMode.LAYER_WISE)
    with pytest.raises(ValueError, match="non-negative"):
        DirectSolveOperator(torch.eye(2), value)


def test_regularization_wrong_type() -> None:
    with pytest.raises(TypeError, match="'regularization' must be a float or None, got str"):
        DirectInfluence(make_mlp(), F.cross_entropy, "0.1")  # type: ignore[arg-type]


def test_unknown_block_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown blocks \['fc'\]; valid block names are \['0', '2'\]"
    ):
        DirectInfluence(make_mlp(), F.cross_entropy, {"fc": 0.1}, BlockMode.LAYER_WISE)
    from collections import OrderedDict

    with pytest.raises(ValueError, match=r"unknown or frozen parameters \['fc.weight'\]"):
        DirectInfluence(make_mlp(), F.cross_entropy, 0.1, OrderedDict(a=["fc.weight"]))
    with pytest.raises(TypeError, match="'block_structure' must be a BlockMode"):
        DirectInfluence(make_mlp(), F.cross_entropy, 0.1, "full")  # type: ignore[arg-type]


def test_not_fitted() -> None:
    x, y = classification_data()
    model = DirectInfluence(make_mlp(), F.cross_entropy, 0.1)
    assert not model.is_fitted
    for call in (
        lambda: model.influences(x, y),
        lambda: model.influence_factors(x, y),
        lambda: model.influences_from_factors(torch.ones(1, 2), x, y),
        lambda: model.influences_by_block(x, y),
    ):
        with pytest.raises(NotFittedException, match="DirectInfluence.*fit"):
            call()


def test_unsupported_mode(fitted) -> None:
    model, x, y = fitted
    with pytest.raises(UnsupportedInfluenceModeException, match="'mode'.*'sideways'"):
        model.influences(x[:2], y[:2], x, y, mode="sideways")  # type: ignore[arg-type]
    assert model.influences(x[:2], y[:2], x, y, mode="up").shape == (2, 60)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"'second_order_mode' must be one of "
        r"\['HESSIAN', 'GAUSS_NEWTON', 'GENERALIZED_GAUSS_NEWTON'\], got 'fisher'",
    ):
        DirectInfluence(make_mlp(), F.cross_entropy, 0.1, second_order_mode="fisher")  # type: ignore[arg-type]
    assert SecondOrderMode("gauss_newton") is SecondOrderMode.GAUSS_NEWTON
    assert InfluenceMode("perturbation") is InfluenceMode.Perturbation


def test_nan_gradients(fitted) -> None:
    model, x, y = fitted
    x_bad = x[:3].clone()
    x_bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"NaN or Inf in the per-sample gradients in block '0'"):
        model.influences(x_bad, y[:3], x, y)
    gp = TorchGradientProvider(torch.nn.Linear(2, 1), F.mse_loss)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gp.grads(TorchBatch(torch.tensor([[math.inf, 1.0]]), torch.zeros(1, 1)))


def test_bad_dataloader() -> None:
    x, y = classification_data()
    with pytest.raises(
        TypeError, match="'data' must yield pairs \\(x, y\\) of tensors; batch 0 is a Tensor"
    ):
        DirectInfluence(make_mlp(), F.cross_entropy, 0.1).fit([x])
    with pytest.raises(ValueError, match="'dataloader' yielded no batches"):
        DirectInfluence(make_mlp(), F.cross_entropy, 0.1).fit([])


def test_model_type_and_no_parameters() -> None:
    with pytest.raises(TypeError, match="'model' must be a torch.nn.Module, got function"):
        DirectInfluence(lambda x: x, F.cross_entropy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'model' has no trainable parameters"):
        DirectInfluence(torch.nn.ReLU(), F.cross_entropy)


# --- labels and empty batches at influences ------------------------------------------------


def _fitted_classifier() -> tuple:
    x, y = classification_data(n=24)
    return DirectInfluence(make_mlp().eval(), F.cross_entropy, 0.1).fit(loader(x, y)), x, y


def test_n_by_1_class_labels_at_influences_name_y() -> None:
    model, x, y = _fitted_classifier()
    message = r"'y' must hold class indices of shape \(N,\) for cross_entropy, got shape \(2, 1\)"
    with pytest.raises(ValueError, match=message):
        model.influences(x[:2], y[:2, None], x, y)


def test_zero_points_at_influences_are_refused() -> None:
    model, x, y = _fitted_classifier()
    message = r"Parameters 'x' and 'y' hold no points \(first dimension 0\)"
    with pytest.raises(ValueError, match=message):
        model.influences(x[:2], y[:2], x[:0], y[:0])
    with pytest.raises(ValueError, match=message):
        model.influences(x[:0], y[:0], x, y)


def test_int32_class_labels_are_accepted() -> None:
    model, x, y = _fitted_classifier()
    reference = model.influences(x[:3], y[:3], x, y)
    model32 = DirectInfluence(model.model, F.cross_entropy, 0.1).fit(loader(x, y.int()))
    values = model32.influences(x[:3], y[:3].int(), x, y.to(torch.int32))
    torch.testing.assert_close(values, reference, rtol=1e-12, atol=0)
