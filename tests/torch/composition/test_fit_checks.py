"""Checks of `fit` and of the test points that turn a silently meaningless answer into an
error: gradients that are zero at every point of a batch, weights changed after `fit`."""

from __future__ import annotations

import cloudpickle
import pytest
import torch.nn.functional as F

import torch
from helpers import classification_data, loader, make_mlp
from influx.torch import DirectInfluence, EkfacInfluence


def regression_problem() -> tuple:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    x = torch.randn(24, 4)
    y = x[:, :1] * 2.0 + 0.1 * torch.randn(24, 1)
    return net.eval(), x, y


def test_cross_entropy_on_a_regression_net_is_refused_at_fit() -> None:
    net, x, y = regression_problem()
    message = (
        r"gradients of the loss torch\.nn\.functional\.cross_entropy .* are zero at every "
        r"point of 'data'"
    )
    with pytest.raises(ValueError, match=message):
        DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))


def test_forgotten_loss_of_ekfac_is_refused_at_fit() -> None:
    net, x, y = regression_problem()
    with pytest.raises(ValueError, match=r"cross_entropy .*use mse_loss for regression"):
        EkfacInfluence(net, True).fit(loader(x, y))


def test_zero_test_gradients_are_refused_at_influences() -> None:
    torch.manual_seed(0)
    net, x, y = make_mlp().eval(), *classification_data(n=24)
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))

    def masked(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kept = F.cross_entropy(outputs, target.clamp(min=0), reduction="none") * (target >= 0)
        return kept.mean()

    model.loss = masked
    values = model.influences(x[:3], y[:3], x, y)
    assert values.abs().max() > 0
    with pytest.raises(ValueError, match=r"zero at every point of 'x_test' \(3 points"):
        model.influences(x[:3], -torch.ones(3, dtype=torch.long), x, y)


def test_nonzero_gradients_pass_with_a_mean_gradient_of_zero() -> None:
    # At a minimum of the batch loss the mean gradient vanishes, the per-sample ones do not.
    x = torch.randn(16, 2)
    y = x @ torch.tensor([[1.0], [-2.0]]) + 0.3 * torch.randn(16, 1)
    net = torch.nn.Linear(2, 1)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(16, 1)], 1), y).solution
    with torch.no_grad():
        net.weight.copy_(solution[:2].T)
        net.bias.copy_(solution[2])
    model = DirectInfluence(net, F.mse_loss, 0.0).fit(loader(x, y))
    assert model.influences(x[:2], y[:2], x, y).abs().max() > 1e-6


def test_weights_trained_after_fit_are_refused_naming_fit() -> None:
    torch.manual_seed(0)
    net, (x, y) = make_mlp().eval(), classification_data(n=24)
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    factors = model.influence_factors(x[:2], y[:2])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    message = r"parameters or buffers \['0.bias', '0.weight', .*changed after 'fit'"
    with pytest.raises(ValueError, match=message):
        model.influences(x[:2], y[:2], x, y)
    with pytest.raises(ValueError, match="Call 'fit' again"):
        model.influence_factors(x[:2], y[:2])
    with pytest.raises(ValueError, match="changed after 'fit'"):
        model.influences_from_factors(factors, x, y)
    refit = model.fit(loader(x, y)).influences(x[:2], y[:2], x, y)
    assert torch.isfinite(refit).all()


def test_a_replaced_parameter_or_a_batch_norm_update_is_refused() -> None:
    torch.manual_seed(0)
    x, y = classification_data(n=24)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    model = DirectInfluence(net.eval(), F.cross_entropy, 0.1).fit(loader(x, y))
    net.train()(x)
    net.eval()
    with pytest.raises(ValueError, match=r"\['1.num_batches_tracked', '1.running_mean'"):
        model.influences(x[:2], y[:2], x, y)
    model.fit(loader(x, y))
    net[2].weight = torch.nn.Parameter(net[2].weight.detach() * 2)
    with pytest.raises(ValueError, match=r"\['2.weight'\] changed after 'fit'"):
        model.influences(x[:2], y[:2], x, y)


def test_a_copy_keeps_the_check_and_an_unpickled_model_takes_its_own_tensors() -> None:
    torch.manual_seed(0)
    net, (x, y) = make_mlp().eval(), classification_data(n=24)
    model = DirectInfluence(net, F.cross_entropy, 0.1).fit(loader(x, y))
    restored = cloudpickle.loads(cloudpickle.dumps(model))  # as a Dask worker receives it
    torch.testing.assert_close(
        restored.influences(x[:2], y[:2], x, y), model.influences(x[:2], y[:2], x, y)
    )
    with torch.no_grad():
        net[0].weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"\['0.weight'\] changed after 'fit'"):
        model.with_regularization(0.2).influences(x[:2], y[:2], x, y)
