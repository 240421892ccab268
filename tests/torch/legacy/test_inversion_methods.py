"""The functional facade: TwiceDifferentiable, TensorUtilities, the registry and solve_hvp."""

import warnings
from typing import Any

import pytest
from torch.utils.data import DataLoader

import torch
from helpers import LinearRegression, loader, rel_err
from influx.inversion import InversionMethod, InversionRegistry, solve_hvp
from influx.torch.legacy.inversion_methods import TorchTensorUtilities, TorchTwiceDifferentiable
from influx.twice_differentiable import InverseHvpResult, TensorUtilities, TwiceDifferentiable


def _wrapped(linreg: LinearRegression) -> TorchTwiceDifferentiable:
    linreg.model.eval()
    return TorchTwiceDifferentiable(linreg.model, linreg.loss)


def test_grad_hessian_and_mvp_match_closed_form(linreg: LinearRegression) -> None:
    td = _wrapped(linreg)
    assert td.num_params == linreg.n_params
    assert len(td.parameters) == 2
    expected_grad = linreg.grads(linreg.x, linreg.y).mean(0)
    assert rel_err(td.grad(linreg.x, linreg.y), expected_grad) < 1e-12
    assert rel_err(td.hessian(linreg.x, linreg.y), linreg.hessian()) < 1e-12
    g = td.grad(linreg.x, linreg.y, create_graph=True)
    v = torch.randn(4, linreg.n_params)
    assert rel_err(td.mvp(g, v, td.parameters), v @ linreg.hessian()) < 1e-12
    assert td.mvp(g, v[0], td.parameters).shape == (linreg.n_params,)
    with pytest.raises(ValueError, match=r"'v' must have shape \(15,\) or \(D, 15\)"):
        td.mvp(g, torch.ones(3, 2), td.parameters)


def test_training_mode_warns(linreg: LinearRegression) -> None:
    linreg.model.train()
    with pytest.warns(UserWarning, match="training mode"):
        TorchTwiceDifferentiable(linreg.model, linreg.loss)


def test_tensor_utilities_registry(linreg: LinearRegression) -> None:
    assert TensorUtilities.from_twice_differentiable(_wrapped(linreg)) is TorchTensorUtilities
    x = torch.arange(6.0).reshape(2, 3)
    assert TorchTensorUtilities.slice(x, 1, 3, axis=1).tolist() == [[1.0, 2.0], [4.0, 5.0]]
    gen = (x[i : i + 1] for i in range(2))
    assert torch.equal(TorchTensorUtilities.cat_gen(gen, (2, 3), _wrapped(linreg)), x)

    class Other(TwiceDifferentiable):  # type: ignore[type-arg]
        pass

    Other.__abstractmethods__ = frozenset()  # instantiable for the lookup
    with pytest.raises(KeyError, match="No TensorUtilities registered for Other"):
        TensorUtilities.from_twice_differentiable(Other.__new__(Other))
    with pytest.raises(
        TypeError, match="must define the class attribute 'twice_differentiable_type'"
    ):

        class Missing(TorchTensorUtilities):
            twice_differentiable_type = None  # type: ignore[assignment]


def test_inverse_hvp_result_unpacks() -> None:
    x, info = InverseHvpResult(torch.ones(2), {"method": "direct"})
    assert torch.equal(x, torch.ones(2)) and info == {"method": "direct"}


METHODS = {
    InversionMethod.Direct: ({}, 1e-8),
    InversionMethod.Cg: ({"rtol": 1e-12, "atol": 1e-14}, 1e-8),
    InversionMethod.Lissa: ({"maxiter": 3000, "scale": "auto", "rtol": 1e-10}, 1e-3),
    InversionMethod.Arnoldi: ({"rank": 15}, 1e-8),
    InversionMethod.Nystroem: ({"rank": 15}, 1e-8),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_solve_hvp_matches_closed_form(linreg: LinearRegression, method: InversionMethod) -> None:
    lam = 0.1
    kwargs, tolerance = METHODS[method]
    # LiSSA samples one mini-batch per step; with the full batch it converges to the solution
    batch_size = 40 if method is InversionMethod.Lissa else 7
    b = torch.randn(3, linreg.n_params)
    expected = torch.linalg.solve(linreg.hessian() + lam * torch.eye(linreg.n_params), b.T).T
    x, info = solve_hvp(
        method,
        _wrapped(linreg),
        loader(linreg.x, linreg.y, batch_size),
        b,
        hessian_perturbation=lam,
        **kwargs,
    )
    assert rel_err(x, expected) < tolerance, (method, rel_err(x, expected), info)
    assert info["converged"] is True
    x1, _ = solve_hvp(
        method.value,
        _wrapped(linreg),
        loader(linreg.x, linreg.y, 40),
        b[0],
        hessian_perturbation=lam,
        **kwargs,
    )
    assert rel_err(x1, expected[0]) < tolerance


def test_registry_errors(linreg: LinearRegression) -> None:
    with pytest.raises(TypeError, match="'model_type' must be a subclass of TwiceDifferentiable"):
        InversionRegistry.register("torch", InversionMethod.Direct)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'inversion_method' must be an InversionMethod, got str"):
        InversionRegistry.register(TorchTwiceDifferentiable, "direct")  # type: ignore[arg-type]

    def wrong_types(
        model: int, training_data: DataLoader, b: torch.Tensor, hessian_perturbation: float = 0.0
    ) -> Any:
        return None

    with pytest.raises(ValueError, match="'model' of type TorchTwiceDifferentiable"):
        InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Cg)(wrong_types)

    def too_few(model: TorchTwiceDifferentiable) -> Any:
        return None

    with pytest.raises(ValueError, match="must take the parameters"):
        InversionRegistry.register(TorchTwiceDifferentiable, InversionMethod.Cg)(too_few)

    class Fresh(TorchTwiceDifferentiable):
        pass

    def solver(
        model: Fresh, training_data: DataLoader, b: torch.Tensor, hessian_perturbation: float = 0.0
    ) -> InverseHvpResult:
        return InverseHvpResult(b, {"method": "identity"})

    InversionRegistry.register(Fresh, InversionMethod.Lissa)(solver)
    with pytest.warns(UserWarning, match="already registered"):
        InversionRegistry.register(Fresh, InversionMethod.Lissa)(solver)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InversionRegistry.register(Fresh, InversionMethod.Lissa, overwrite=True)(solver)
    fresh = Fresh(linreg.model.eval(), linreg.loss)
    x, info = solve_hvp(InversionMethod.Lissa, fresh, [], torch.ones(2))
    assert info == {"method": "identity"}
    # a subclass inherits its base's registrations
    assert solve_hvp(
        "direct", fresh, loader(linreg.x, linreg.y), torch.ones(15), hessian_perturbation=1.0
    ).x.shape == (15,)

    class Unregistered(TwiceDifferentiable):  # type: ignore[type-arg]
        pass

    Unregistered.__abstractmethods__ = frozenset()
    with pytest.raises(ValueError, match="No function registered for Unregistered"):
        solve_hvp("direct", Unregistered.__new__(Unregistered), [], torch.ones(2))
    with pytest.raises(ValueError, match="'inversion_method' must be one of"):
        solve_hvp("newton", fresh, [], torch.ones(2))
    for key in [k for k in InversionRegistry.registry if k[0] is Fresh]:
        del InversionRegistry.registry[key]


def test_solve_hvp_inverse_harmonic_mean_matches_its_definition(linreg: LinearRegression) -> None:
    lam = 0.5
    g = linreg.grads(linreg.x, linreg.y)
    eye = torch.eye(linreg.n_params)
    inverse = torch.stack([torch.linalg.inv(torch.outer(gi, gi) + lam * eye) for gi in g]).mean(0)
    b = torch.randn(2, linreg.n_params)
    x, info = solve_hvp(
        InversionMethod.InverseHarmonicMean,
        _wrapped(linreg),
        loader(linreg.x, linreg.y, 9),
        b,
        hessian_perturbation=lam,
    )
    assert rel_err(x, b @ inverse) < 1e-10
    assert info["method"] == "inverse_harmonic_mean"


def test_arnoldi_at_lower_rank_is_approximate(linreg: LinearRegression) -> None:
    lam = 0.1
    b = torch.randn(2, linreg.n_params)
    expected = torch.linalg.solve(linreg.hessian() + lam * torch.eye(linreg.n_params), b.T).T
    errors = [
        rel_err(
            solve_hvp(
                "arnoldi",
                _wrapped(linreg),
                loader(linreg.x, linreg.y),
                b,
                hessian_perturbation=lam,
                rank=rank,
                use_woodbury=True,
            ).x,
            expected,
        )
        for rank in (3, 9, 15)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


def test_solve_hvp_ekfac_applies_the_ekfac_operator(linreg: LinearRegression) -> None:
    """The facade's Ekfac method returns what EkfacInfluence's operator gives for the same
    data and regularization (its accuracy is tested in tests/torch/kfac/test_factors.py)."""
    from influx.torch import EkfacInfluence

    lam = 0.1
    b = torch.randn(2, linreg.n_params)
    x, info = solve_hvp(
        InversionMethod.Ekfac,
        _wrapped(linreg),
        loader(linreg.x, linreg.y, 8),
        b,
        hessian_perturbation=lam,
    )
    assert info["method"] == "ekfac" and x.shape == b.shape
    model = EkfacInfluence(
        linreg.model, update_diagonal=True, hessian_regularization=lam, loss=linreg.loss
    ).fit(loader(linreg.x, linreg.y, 8))
    op = model.block_mapper.composable_block_dict["model"].op
    assert rel_err(x, op.apply(b)) < 1e-12
    x1, _ = solve_hvp(
        "ekfac", _wrapped(linreg), loader(linreg.x, linreg.y, 8), b[0], hessian_perturbation=lam
    )
    assert rel_err(x1, x[0]) < 1e-12
