"""One composition: any curvature with any valid inverse method; fits saved as tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import torch
from helpers import classification_data, loader, make_mlp, rel_err
from influx.errors import InfluxError, UnsafeFitFileError
from influx.torch import (
    ArnoldiInfluence,
    ArnoldiSolver,
    CgInfluence,
    CgSolver,
    ComposedInfluence,
    DirectInfluence,
    DirectSolver,
    EkfacInfluence,
    FactoredSolver,
    InverseHarmonicMeanInfluence,
    InverseHarmonicMeanSolver,
    KroneckerCurvature,
    LissaInfluence,
    LissaSolver,
    ModeCurvature,
    NystroemSketchInfluence,
    SecondOrderMode,
)
from influx.torch.composition.persistence import read_fit_info

F = torch.nn.functional
GN = SecondOrderMode.GAUSS_NEWTON


def _setup():  # type: ignore[no-untyped-def]
    x, y = classification_data(n=48)
    return make_mlp(), x, y, loader(x, y)


def test_cg_on_kronecker_curvature_equals_its_exact_inverse() -> None:
    net, x, y, data = _setup()
    exact = EkfacInfluence(net, update_diagonal=True, loss=F.cross_entropy, regularization=0.01)
    cg = ComposedInfluence(
        net, F.cross_entropy, KroneckerCurvature(), CgSolver(rtol=1e-12, atol=0.0), 0.01
    )
    expected = exact.fit(data).influences(x[:5], y[:5], x, y)
    assert rel_err(cg.fit(data).influences(x[:5], y[:5], x, y), expected) < 1e-8
    assert cg.block_names == exact.block_names == ["0", "2"]


def test_arnoldi_on_precomputed_gauss_newton_at_full_rank_equals_direct() -> None:
    net, x, y, data = _setup()
    direct = DirectInfluence(net, F.cross_entropy, 0.05, second_order_mode=GN).fit(data)
    arnoldi = ComposedInfluence(
        net,
        F.cross_entropy,
        ModeCurvature(GN, precompute_grad=True),
        ArnoldiSolver(rank=57, tol=1e-12, use_woodbury=True),
        0.05,
    ).fit(data)
    expected = direct.influences(x[:4], y[:4], x, y)
    assert rel_err(arnoldi.influences(x[:4], y[:4], x, y), expected) < 1e-8


def test_direct_on_kronecker_curvature_equals_factored_inverse() -> None:
    net, x, y, data = _setup()
    factored = ComposedInfluence(net, F.cross_entropy, KroneckerCurvature(), FactoredSolver(), 0.1)
    direct = ComposedInfluence(net, F.cross_entropy, KroneckerCurvature(), DirectSolver(), 0.1)
    expected = factored.fit(data).influences(x[:4], y[:4], x, y)
    assert rel_err(direct.fit(data).influences(x[:4], y[:4], x, y), expected) < 1e-10


@pytest.mark.parametrize(
    "curvature, solver, needs",
    [
        (KroneckerCurvature(), LissaSolver(), "a curvature averaged over mini-batches"),
        (ModeCurvature(SecondOrderMode.HESSIAN), InverseHarmonicMeanSolver(), "empirical Fisher"),
        (ModeCurvature(GN), FactoredSolver(), "a Kronecker-factored curvature"),
    ],
)
def test_invalid_pairs_are_named(curvature, solver, needs) -> None:  # type: ignore[no-untyped-def]
    net, _, _, data = _setup()
    model = ComposedInfluence(net, F.cross_entropy, curvature, solver, 0.1)
    with pytest.raises(TypeError, match=f"{type(solver).__name__} cannot invert a .*{needs}"):
        model.fit(data)


def test_composed_influence_checks_its_parts() -> None:
    net = make_mlp()
    with pytest.raises(TypeError, match="Parameter 'curvature' must be a Curvature, got str"):
        ComposedInfluence(net, F.cross_entropy, "hessian", DirectSolver())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Parameter 'solver' must be a Solver, got int"):
        ComposedInfluence(net, F.cross_entropy, ModeCurvature(GN), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'regularization' must be positive for every block"):
        ComposedInfluence(
            net,
            F.cross_entropy,
            ModeCurvature(GN),
            InverseHarmonicMeanSolver(),
            regularization=None,
        )


def _models(net: torch.nn.Module):  # type: ignore[no-untyped-def]
    return {
        "direct": lambda: DirectInfluence(net, F.cross_entropy, 0.1),
        "cg": lambda: CgInfluence(net, F.cross_entropy, 0.1),
        "lissa": lambda: LissaInfluence(net, F.cross_entropy, 0.1, maxiter=20, scale=50.0),
        "arnoldi": lambda: ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=5),
        "nystroem": lambda: NystroemSketchInfluence(
            net, F.cross_entropy, 0.1, rank=5, second_order_mode=GN, seed=3
        ),
        "ihm": lambda: InverseHarmonicMeanInfluence(net, F.cross_entropy, 0.1),
        "ekfac": lambda: EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1),
        "composed": lambda: ComposedInfluence(
            net, F.cross_entropy, KroneckerCurvature(), CgSolver(rtol=1e-10), 0.1
        ),
    }


@pytest.mark.parametrize("name", list(_models(torch.nn.Linear(1, 1))))
@pytest.mark.parametrize("use_before_saving", [False, True])
def test_save_and_load_are_bit_identical(
    name: str, use_before_saving: bool, tmp_path: Path
) -> None:
    net, x, y, data = _setup()
    make = _models(net)[name]
    model = make().fit(data)
    if use_before_saving:
        model.influences(x[:2], y[:2], x[:5], y[:5])
    path = model.save(tmp_path / f"{name}.fit")
    fresh = make().fit(data) if name == "lissa" else None  # LiSSA starts again at batch 0
    loaded = make().load_fit(path, data=data)
    expected = (fresh or model).influences(x[:3], y[:3], x, y)
    assert torch.equal(loaded.influences(x[:3], y[:3], x, y), expected)
    info = read_fit_info(path)
    assert info["class"] == type(model).__qualname__
    assert info["n_parameters"] == 57 and info["fingerprint"]


def test_loaded_ekfac_has_its_documented_attributes(tmp_path: Path) -> None:
    net, _, _, data = _setup()
    model = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1).fit(data)
    loaded = EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1).load_fit(
        model.save(tmp_path / "ekfac.fit")
    )
    for attribute in ("kronecker_factors", "eigenbases", "eigenvalues"):
        saved, restored = getattr(model, attribute), getattr(loaded, attribute)
        assert list(restored) == ["0", "2"] and list(saved) == list(restored)
    a, b = model.kronecker_factors["0"], loaded.kronecker_factors["0"]
    assert torch.equal(a.input_covariance, b.input_covariance) and a.n_samples == b.n_samples
    assert torch.equal(model.eigenvalues["2"], loaded.eigenvalues["2"])
    assert torch.equal(
        model.eigenbases["2"].output_eigenvectors, loaded.eigenbases["2"].output_eigenvectors
    )


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("code ran while loading",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_file_with_a_pickled_callable_is_rejected(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    net, _, _, data = _setup()
    path = DirectInfluence(net, F.cross_entropy, 0.1).fit(data).save(tmp_path / "fit.fit")
    content = torch.load(path, weights_only=True)
    content["tensors"]["0/matrix"] = _Payload()  # type: ignore[assignment]
    crafted = tmp_path / "crafted.fit"
    with open(crafted, "wb") as handle:
        pickle.dump(content, handle)
    torch.save(content, tmp_path / "crafted2.fit")
    for bad in (crafted, tmp_path / "crafted2.fit"):
        with pytest.raises(UnsafeFitFileError, match="is not a fit saved by influx") as error:
            DirectInfluence(net, F.cross_entropy, 0.1).load_fit(bad)
        assert isinstance(error.value, (InfluxError, ValueError))
    assert "code ran" not in capsys.readouterr().out


def test_a_file_of_the_old_format_is_refused(tmp_path: Path) -> None:
    net, _, _, _ = _setup()
    old = tmp_path / "old.pt"
    torch.save({"header": {"format": "influx-fit/1"}, "blocks": b""}, old)
    with pytest.raises(UnsafeFitFileError, match="is not a fit saved by influx"):
        DirectInfluence(net, F.cross_entropy, 0.1).load_fit(old)


def test_incomplete_or_non_tensor_fit_files_are_refused(tmp_path: Path) -> None:
    net, _, _, data = _setup()
    path = DirectInfluence(net, F.cross_entropy, 0.1).fit(data).save(tmp_path / "fit.fit")
    content = torch.load(path, weights_only=True)
    missing = dict(content, tensors={})
    torch.save(missing, tmp_path / "missing.fit")
    with pytest.raises(ValueError, match="Incomplete operator state"):
        DirectInfluence(net, F.cross_entropy, 0.1).load_fit(tmp_path / "missing.fit")
    not_tensor = dict(content, tensors={"0/matrix": 3})
    torch.save(not_tensor, tmp_path / "not_tensor.fit")
    with pytest.raises(UnsafeFitFileError, match="holds entries that are not tensors"):
        DirectInfluence(net, F.cross_entropy, 0.1).load_fit(tmp_path / "not_tensor.fit")
