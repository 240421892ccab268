"""Scoring Kronecker-factored layers from their inputs and output gradients: equal to the
per-sample-gradient path (float64, 1e-10) for Linear with and without bias, sequence inputs and
Conv2d, in both influence modes, for self-influence and in chunks; the label draws of the
sampled Fisher."""

from __future__ import annotations

import gc
import pickle
from typing import Any, Callable, Dict, List

import pytest

import torch
from helpers import classification_data, loader
from influx import InfluenceMode
from influx.torch import CgSolver, ComposedInfluence, EkfacInfluence, TorchBatch
from influx.torch.composition.block_mapper import TorchBlockMapper
from influx.torch.composition.curvatures import KroneckerCurvature
from influx.torch.kfac import scoring as kfac_scores
from influx.torch.kfac.contraction import layer_scores, uses_contraction
from influx.torch.kfac.layers import find_layers
from influx.torch.kfac.operators import KroneckerFactoredOperator
from influx.torch.kfac.scoring import KroneckerBlockMapper
from influx.torch.kfac.signals import UnscorableModelError, training_signals

F = torch.nn.functional
TOL = dict(rtol=1e-10, atol=1e-10)


class SequenceNet(torch.nn.Module):
    """A Linear layer applied to every position of a sequence, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x.reshape(x.shape[0], 5, 3))).mean(dim=1))


def _conv(padding_mode: str) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 5, 3)),
        torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode=padding_mode),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(30, 3),
    )


NETS: Dict[str, Callable[[], torch.nn.Module]] = {
    "linear_bias": lambda: torch.nn.Sequential(
        torch.nn.Linear(15, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ),
    "linear_no_bias": lambda: torch.nn.Sequential(
        torch.nn.Linear(15, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 3, bias=False)
    ),
    "sequence": SequenceNet,
    "conv2d": lambda: _conv("zeros"),
    "conv2d_reflect": lambda: _conv("reflect"),
}


def _fitted(name: str, chunk_bytes: int = 2_000) -> EkfacInfluence:
    torch.manual_seed(0)
    x, y = classification_data(40, d_in=15)
    model = EkfacInfluence(NETS[name](), update_diagonal=True, hessian_regularization=0.1)
    model.fit(loader(x, y))
    assert isinstance(model.block_mapper, KroneckerBlockMapper)
    model.block_mapper.chunk_bytes = chunk_bytes  # several chunks of training points
    return model


def _per_sample_path(model: EkfacInfluence, compute: Callable[[], Any]) -> Any:
    """`compute()` with the blocks scored from per-sample gradients (the generic mapper)."""
    mapper = model.block_mapper
    model.block_mapper = TorchBlockMapper(mapper.composable_block_dict)
    try:
        return compute()
    finally:
        model.block_mapper = mapper


@pytest.mark.parametrize("name", list(NETS))
def test_scores_equal_the_per_sample_gradient_path(name: str) -> None:
    model = _fitted(name)
    x, y = classification_data(40, d_in=15)
    x_test, y_test = classification_data(4, d_in=15, seed=3)

    def everything() -> Dict[str, Any]:
        factors = model.influence_factors(x_test, y_test)
        return {
            "influences": model.influences(x_test, y_test, x, y),
            "by_layer": model.influences_by_layer(x_test, y_test, x, y),
            "from_factors": model.influences_from_factors(factors, x, y),
            "from_factors_by_layer": model.influences_from_factors_by_layer(
                model.influence_factors_by_layer(x_test, y_test), x, y
            ),
            "self": model.self_influences(x, y),
            "self_by_layer": model.self_influences_by_block(x, y),
            "perturbation": model.influences(
                x_test, y_test, x[:9], y[:9], mode=InfluenceMode.Perturbation
            ),
            "test_by_test": model.influences(x_test, y_test),
        }

    new = everything()
    reference = _per_sample_path(model, everything)
    for key, value in reference.items():
        if isinstance(value, dict):
            assert list(new[key]) == list(value), key
            for layer in value:
                torch.testing.assert_close(new[key][layer], value[layer], **TOL)
        else:
            torch.testing.assert_close(new[key], value, **TOL)
    assert new["influences"].shape == (4, 40)
    assert new["perturbation"].shape == (4, 9, 15)


def test_chunking_does_not_change_the_scores() -> None:
    x, y = classification_data(40, d_in=15)
    x_test, y_test = classification_data(4, d_in=15, seed=3)
    one_chunk = _fitted("conv2d", chunk_bytes=2**30).influences(x_test, y_test, x, y)
    many = _fitted("conv2d", chunk_bytes=1).influences(x_test, y_test, x, y)  # chunks of 8
    torch.testing.assert_close(many, one_chunk, **TOL)


@pytest.mark.parametrize("name", ["linear_bias", "conv2d"])
def test_test_factors_in_chunks_equal_the_whole_batch(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test factors formed a few test points at a time equal those of the whole batch."""
    x, y = classification_data(40, d_in=15)
    x_test, y_test = classification_data(5, d_in=15, seed=3)
    model = _fitted(name)
    whole = model.influences(x_test, y_test, x, y)
    factors = model.influence_factors(x_test, y_test)
    by_block = model.influence_factors_by_block(x_test, y_test)
    monkeypatch.setattr(kfac_scores, "TEST_CHUNK_BYTES", 1)  # one test point per chunk
    torch.testing.assert_close(model.influences(x_test, y_test, x, y), whole, **TOL)
    torch.testing.assert_close(model.influence_factors(x_test, y_test), factors, **TOL)
    chunked = model.influence_factors_by_block(x_test, y_test)
    assert list(chunked) == list(by_block)
    for key, value in by_block.items():
        torch.testing.assert_close(chunked[key], value, **TOL)
    # and the factors are those of the per-sample gradients
    reference = _per_sample_path(model, lambda: model.influence_factors(x_test, y_test))
    torch.testing.assert_close(factors, reference, **TOL)


def test_chunks_grow_with_the_size_of_the_test_factors() -> None:
    """A chunk's signals may take half the size of the test factors: chunks of the minimum
    size without factors, one chunk for factors as large as the batch's signals."""
    x, y = classification_data(40, d_in=15)
    mapper = _fitted("conv2d", chunk_bytes=1).block_mapper
    assert isinstance(mapper, KroneckerBlockMapper)
    batch = TorchBatch(x, y)
    small = [stop - start for start, stop, _ in mapper._chunks(batch)]
    large = [stop - start for start, stop, _ in mapper._chunks(batch, floor_bytes=2**30)]
    assert small == [8] * 5
    assert large == [8, 32]  # the first chunk measures the signals


def test_composed_kronecker_curvature_with_cg_uses_the_layer_scores() -> None:
    x, y = classification_data(40, d_in=15)
    x_test, y_test = classification_data(4, d_in=15, seed=3)
    torch.manual_seed(0)
    model = ComposedInfluence(
        NETS["linear_bias"](), F.cross_entropy, KroneckerCurvature(), CgSolver(rtol=1e-12), 0.1
    ).fit(loader(x, y))
    assert isinstance(model.block_mapper, KroneckerBlockMapper)
    values = model.influences(x_test, y_test, x, y)
    reference = _per_sample_path(model, lambda: model.influences(x_test, y_test, x, y))  # type: ignore[arg-type]
    torch.testing.assert_close(values, reference, **TOL)
    # with_regularization keeps the mapper
    assert isinstance(model.with_regularization(0.2).block_mapper, KroneckerBlockMapper)


@pytest.mark.parametrize("positions", [1, 4])
@pytest.mark.parametrize("shape", [(3, 11), (11, 3)])
def test_layer_scores_equal_inner_products_with_formed_gradients(
    positions: int, shape: tuple
) -> None:
    m, k = shape
    n, q = 6, 2
    factors, a, d = torch.randn(q, m, k), torch.randn(n, positions, k), torch.randn(n, positions, m)
    grads = torch.einsum("ntm,ntk->nmk", d, a)  # sum_t delta_t a_t^T
    expected = torch.einsum("qmk,nmk->qn", factors, grads)
    torch.testing.assert_close(layer_scores(factors, a, d), expected, **TOL)


def test_contraction_is_chosen_for_wide_single_position_layers_only() -> None:
    assert uses_contraction(n_factors=4, positions=1, out_dim=300, in_dim=65)
    assert not uses_contraction(n_factors=64, positions=1, out_dim=32, in_dim=65)  # small layer
    assert not uses_contraction(n_factors=4, positions=64, out_dim=300, in_dim=65)  # positions


class _ScaledWeightLinear(torch.nn.Linear):
    """A Linear whose forward passes a copy of its weight to `F.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * 1.0, self.bias)


def test_layers_are_recorded_as_modules_whatever_their_forward_passes_to_linear() -> None:
    x, y = classification_data(20)
    x_test, y_test = classification_data(3, seed=3)
    torch.manual_seed(0)
    net = torch.nn.Sequential(_ScaledWeightLinear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1)
    model.fit(loader(x, y))
    assert isinstance(model.block_mapper, KroneckerBlockMapper)
    signals = training_signals(model.model, model.layer_specs, TorchBatch(x, y), F.cross_entropy)
    assert [tuple(a.shape) for a, _ in signals.values()] == [(20, 1, 6), (20, 1, 5)]
    values = model.influences(x_test, y_test, x, y)
    reference = _per_sample_path(model, lambda: model.influences(x_test, y_test, x, y))
    torch.testing.assert_close(values, reference, **TOL)
    torch.testing.assert_close(
        model.self_influences(x, y), _per_sample_path(model, lambda: model.self_influences(x, y))
    )


def test_layers_used_functionally_are_not_recorded() -> None:
    class Functional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.layer.weight, self.layer.bias)

    x, y = classification_data(8)
    net = Functional()
    with pytest.raises(UnscorableModelError, match=r"Layers \['layer'\] were not called"):
        training_signals(net, find_layers(net), TorchBatch(x, y), F.cross_entropy)
    with pytest.raises(ValueError, match=r"Layers \['layer'\] were not called"):
        EkfacInfluence(net, hessian_regularization=0.1).fit(loader(x, y))


def test_non_finite_training_data_is_an_error_naming_the_layer() -> None:
    model = _fitted("linear_bias")
    x, y = classification_data(40, d_in=15)
    x[17, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in the per-sample gradients in block '0'"):
        model.influences(x[:3], y[:3], x, y)


def test_scoring_registers_no_hooks_on_the_module() -> None:
    model = _fitted("conv2d")
    x, y = classification_data(10, d_in=15)
    calls: List[int] = []
    conv = model.model[1]
    handle = conv.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.influences(x[:2], y[:2], x, y)
    finally:
        handle.remove()
    assert all(not module._forward_hooks for module in model.model.modules())
    assert calls  # the user's own hook ran, on the structure-only copy


def test_mapper_arguments() -> None:
    model = _fitted("linear_bias")
    blocks = model.block_mapper.composable_block_dict
    with pytest.raises(
        ValueError, match=r"'layers' must name the blocks \['0', '2'\], got \['0'\]"
    ):
        KroneckerBlockMapper(blocks, model.model, F.cross_entropy, {"0": model.layer_specs["0"]})
    with pytest.raises(ValueError, match="'chunk_bytes' must be a positive int, got 0"):
        KroneckerBlockMapper(blocks, model.model, F.cross_entropy, model.layer_specs, 0)
    x, y = classification_data(5, d_in=15)
    with pytest.raises(ValueError, match=r"'z_test_factors' must have shape \(N, 96\)"):
        model.influences_from_factors_by_layer(
            {"0": torch.zeros(2, 95), "2": torch.zeros(2, 21)},
            x,
            y,  # type: ignore[arg-type]
        )


# --------------------------------------------------------------------------------------------
# the sampled Fisher: fresh labels for the eigenvalue refit


class _RecordingCrossEntropy(torch.nn.CrossEntropyLoss):
    """The cross-entropy loss, keeping the targets it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: List[torch.Tensor] = []

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.targets.append(target.detach().clone())
        return super().forward(input, target)


def _sampled_fit(seed: int) -> tuple:
    x, y = classification_data(48)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    loss = _RecordingCrossEntropy()
    model = EkfacInfluence(
        net,
        update_diagonal=True,
        hessian_regularization=0.1,
        loss=loss,
        fisher="sampled",
        seed=seed,
    )
    data = loader(x, y, 16)
    loss.targets.clear()
    model.fit(data)
    n_batches = len(data)
    draws = [t for t in loss.targets if t.shape == (16,)]
    # fit's first-batch check evaluates the loss with the training labels first
    draws = draws[-2 * n_batches :]
    first = torch.cat(draws[:n_batches])
    second = torch.cat(draws[n_batches:])
    return model, first, second


def test_sampled_fisher_refit_draws_fresh_labels_and_is_reproducible() -> None:
    model, first, second = _sampled_fit(seed=7)
    assert first.shape == second.shape == (48,)
    assert not torch.equal(first, second)  # the eigenvalues are not fit to the basis's draws
    again, first_again, second_again = _sampled_fit(seed=7)
    assert torch.equal(first, first_again) and torch.equal(second, second_again)
    for layer, values in model.eigenvalues.items():
        torch.testing.assert_close(again.eigenvalues[layer], values, rtol=0, atol=0)
    other, first_other, _ = _sampled_fit(seed=8)
    assert not torch.equal(first, first_other)


def test_operator_applied_to_matrices_equals_flat_application() -> None:
    model = _fitted("conv2d")
    for name, block in model.block_mapper.composable_block_dict.items():
        spec = model.layer_specs[name]
        flat = torch.randn(3, block.op.input_size)
        matrices = spec.matrix_from_flat(flat)
        torch.testing.assert_close(spec.flat_from_matrix(matrices), flat, rtol=0, atol=0)
        applied = block.op.apply_to_matrices(matrices)  # type: ignore[attr-defined]
        torch.testing.assert_close(spec.flat_from_matrix(applied), block.op.apply(flat), **TOL)
    op = model.block_mapper.composable_block_dict["1"].op
    with pytest.raises(
        ValueError, match=r"'matrices' must have shape \(N, 2, 10\), got \(3, 2, 9\)"
    ):
        op.apply_to_matrices(torch.zeros(3, 2, 9))  # type: ignore[attr-defined]


@pytest.mark.parametrize("positions", [1, 50])
def test_operator_applied_to_signals_equals_application_to_formed_gradients(
    positions: int,
) -> None:
    # one position: the signals are rotated; fifty: the gradients are formed first
    model = _fitted("conv2d")
    torch.manual_seed(1)
    for block in model.block_mapper.composable_block_dict.values():
        op = block.op
        m, k = op._m, op._k  # type: ignore[attr-defined]
        inputs, output_grads = torch.randn(3, positions, k), torch.randn(3, positions, m)
        grads = torch.einsum("ntm,ntk->nmk", output_grads, inputs)
        applied = op.apply_to_signals(inputs, output_grads)  # type: ignore[attr-defined]
        assert applied.dtype == torch.float64
        torch.testing.assert_close(applied, op.apply_to_matrices(grads), **TOL)  # type: ignore[attr-defined]
    op = model.block_mapper.composable_block_dict["1"].op
    with pytest.raises(
        ValueError,
        match=r"'inputs' and 'output_grads' must have shapes \(N, T, 10\) and \(N, T, 2\), "
        r"got \(3, 1, 9\) and \(3, 1, 2\)",
    ):
        op.apply_to_signals(torch.zeros(3, 1, 9), torch.zeros(3, 1, 2))  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["linear_bias", "linear_no_bias"])
def test_flat_factors_are_converted_once_while_alive_and_unchanged(name: str) -> None:
    model = _fitted(name)
    mapper = model.block_mapper
    x, y = classification_data(40, d_in=15)
    x_test, y_test = classification_data(4, d_in=15, seed=3)
    factors = model.influence_factors(x_test, y_test)
    first = model.influences_from_factors(factors, x[:20], y[:20])
    converted = mapper._converted._slot[2]  # type: ignore[attr-defined]
    second = model.influences_from_factors(factors, x[20:], y[20:])
    assert mapper._converted._slot[2] is converted  # type: ignore[attr-defined]
    expected = model.influences(x_test, y_test, x, y)
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, **TOL)
    factors *= 2  # changed in place: converted again
    torch.testing.assert_close(model.influences_from_factors(factors, x, y), 2 * expected, **TOL)
    assert pickle.loads(pickle.dumps(mapper._converted))._slot is None  # type: ignore[attr-defined]
    del factors, first, second
    gc.collect()
    assert mapper._converted._slot is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("positions", [2, 16])  # rotating the signals / forming the gradients
def test_operator_applied_to_signals_equals_application_to_their_gradients(positions: int) -> None:
    generator = torch.Generator().manual_seed(3)
    m, k, n = 8, 40, 5
    qa = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))[0]
    qg = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))[0]
    eigenvalues = torch.rand(m, k, generator=generator, dtype=torch.float64)
    op = KroneckerFactoredOperator(qa, qg, eigenvalues, 0.1, "weight", (m, k))
    inputs = torch.randn(n, positions, k, generator=generator, dtype=torch.float64)
    output_grads = torch.randn(n, positions, m, generator=generator, dtype=torch.float64)
    grads = torch.einsum("ntm,ntk->nmk", output_grads, inputs)
    # the reference: the dense inverse of (Q_G x Q_A) diag(s) (Q_G x Q_A)^T + 0.1 I
    q = torch.kron(qg, qa)
    dense = q @ torch.diag(eigenvalues.reshape(-1)) @ q.T + 0.1 * torch.eye(m * k, dtype=qa.dtype)
    expected = torch.linalg.solve(dense, grads.reshape(n, -1).T).T.reshape(n, m, k)
    torch.testing.assert_close(op.apply_to_signals(inputs, output_grads), expected, **TOL)
    with pytest.raises(
        ValueError,
        match=r"'inputs' and 'output_grads' must have shapes \(N, T, 40\) and \(N, T, 8\), "
        r"got \(5, 2, 40\) and \(5, 3, 8\)",
    ):
        op.apply_to_signals(inputs[:, :2], torch.zeros(5, 3, m, dtype=torch.float64))
