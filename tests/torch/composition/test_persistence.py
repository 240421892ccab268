"""Saving and loading fitted influence models."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

import torch
from helpers import classification_data, loader, make_mlp
from influx import InfluenceMode, NotFittedException
from influx.torch import BlockMode, DirectInfluence, SecondOrderMode

F = torch.nn.functional


def _fitted(net: torch.nn.Module, **kwargs) -> DirectInfluence:
    x, y = classification_data()
    return DirectInfluence(net, F.cross_entropy, **kwargs).fit(loader(x, y))


def test_saved_and_loaded_model_is_bit_identical(tmp_path: Path) -> None:
    x, y = classification_data()
    net = make_mlp()
    model = _fitted(net, regularization={"0": 0.1, "2": 0.2}, block_structure=BlockMode.LAYER_WISE)
    path = model.save(tmp_path / "fit.pt")
    loaded = DirectInfluence(
        net, F.cross_entropy, {"0": 0.1, "2": 0.2}, BlockMode.LAYER_WISE
    ).load_fit(path)
    assert loaded.is_fitted
    for mode in InfluenceMode:
        assert torch.equal(
            loaded.influences(x[:4], y[:4], x, y, mode=mode),
            model.influences(x[:4], y[:4], x, y, mode=mode),
        )
    # a fresh copy of the network with the same weights works too (another process)
    clone = make_mlp()
    clone.load_state_dict(net.state_dict())
    other = DirectInfluence(clone, F.cross_entropy, {"0": 0.1, "2": 0.2}, BlockMode.LAYER_WISE)
    assert torch.equal(
        other.load_fit(path).influences(x[:3], y[:3], x, y), model.influences(x[:3], y[:3], x, y)
    )


def test_loading_onto_another_dtype_device_mapping(tmp_path: Path) -> None:
    net = make_mlp()
    model = _fitted(net, regularization=0.1)
    path = model.save(tmp_path / "fit.pt")
    loaded = DirectInfluence(net, F.cross_entropy, 0.1).load_fit(path)
    op = loaded.block_mapper.composable_block_dict["model"].op
    assert op.device == loaded.device


def test_mismatches_fail_clearly(tmp_path: Path) -> None:
    net = make_mlp()
    path = _fitted(net, regularization=0.1).save(tmp_path / "fit.pt")
    with pytest.raises(
        ValueError, match=r"other settings \(regularization: saved 0.1, given 0.2\)"
    ):
        DirectInfluence(net, F.cross_entropy, 0.2).load_fit(path)
    with pytest.raises(ValueError, match="second_order_mode: saved 'SecondOrderMode.HESSIAN'"):
        DirectInfluence(
            net, F.cross_entropy, 0.1, second_order_mode=SecondOrderMode.GAUSS_NEWTON
        ).load_fit(path)
    with pytest.raises(
        ValueError, match=r"made for a model with parameters .*'0.weight': \[6, 5\]"
    ):
        DirectInfluence(make_mlp(hidden=7), F.cross_entropy, 0.1).load_fit(path)
    with pytest.raises(ValueError, match="other parameter values of this model"):
        DirectInfluence(make_mlp(seed=3), F.cross_entropy, 0.1).load_fit(path)
    bogus = tmp_path / "bogus.pt"
    torch.save({"something": 1}, bogus)
    with pytest.raises(ValueError, match="is not a fit saved by influx"):
        DirectInfluence(net, F.cross_entropy, 0.1).load_fit(bogus)
    with pytest.raises(ValueError, match="'path': no file at"):
        DirectInfluence(net, F.cross_entropy, 0.1).load_fit(tmp_path / "missing.pt")
    with pytest.raises(NotFittedException):
        DirectInfluence(net, F.cross_entropy, 0.1).save(tmp_path / "x.pt")


def test_with_regularization_updates_settings(tmp_path: Path) -> None:
    net = make_mlp()
    model = _fitted(net, regularization=0.1)
    assert model.settings["regularization"] == 0.1
    other = model.with_regularization(0.3)
    assert other.settings["regularization"] == 0.3
    path = other.save(tmp_path / "fit.pt")
    DirectInfluence(net, F.cross_entropy, 0.3).load_fit(path)


def _models(net: torch.nn.Module):
    from influx.torch import (
        ArnoldiInfluence,
        CgInfluence,
        EkfacInfluence,
        InverseHarmonicMeanInfluence,
        LissaInfluence,
        NystroemSketchInfluence,
    )

    return {
        "cg": lambda: CgInfluence(net, F.cross_entropy, 0.1),
        "lissa": lambda: LissaInfluence(net, F.cross_entropy, 0.1, maxiter=20, scale=50.0),
        "arnoldi": lambda: ArnoldiInfluence(net, F.cross_entropy, 0.1, rank=5),
        "nystroem": lambda: NystroemSketchInfluence(
            net, F.cross_entropy, 0.1, rank=5, second_order_mode=SecondOrderMode.GAUSS_NEWTON
        ),
        "ihm": lambda: InverseHarmonicMeanInfluence(
            net, F.cross_entropy, 0.1, second_order_mode=SecondOrderMode.GAUSS_NEWTON
        ),
        "ekfac": lambda: EkfacInfluence(net, update_diagonal=True, hessian_regularization=0.1),
    }


@pytest.mark.parametrize("name", ["cg", "lissa", "arnoldi", "nystroem", "ihm", "ekfac"])
def test_every_model_saves_and_loads(name: str, tmp_path: Path) -> None:
    x, y = classification_data()
    net = make_mlp()
    make = _models(net)[name]
    data = loader(x, y)
    torch.manual_seed(0)
    model = make().fit(data)
    path = model.save(tmp_path / f"{name}.pt")
    torch.manual_seed(0)
    expected = model.influences(x[:3], y[:3], x, y)
    try:
        loaded = make().load_fit(path)
    except ValueError as error:
        # operators that apply the curvature through the training data need it again
        assert "Parameter 'data' is required" in str(error)
        loaded = make().load_fit(path, data=data)
    torch.manual_seed(0)
    assert torch.equal(loaded.influences(x[:3], y[:3], x, y), expected)


def test_read_fit_info_without_the_network(tmp_path: Path) -> None:
    from influx import __version__
    from influx.torch.composition.persistence import fingerprint, read_fit_info

    net = make_mlp()
    model = _fitted(net, regularization=0.1, block_structure=BlockMode.LAYER_WISE)
    info = read_fit_info(model.save(tmp_path / "fit.pt"))
    assert set(info) >= {"class", "settings", "blocks", "n_parameters", "fingerprint", "version"}
    assert info["class"] == "DirectInfluence"
    assert info["settings"]["regularization"] == 0.1
    sizes = {
        name: sum(p.numel() for p in params.values()) for name, params in model._blocks.items()
    }
    assert info["blocks"] == sizes and len(sizes) == 2
    assert info["n_parameters"] == model.n_parameters == sum(p.numel() for p in net.parameters())
    assert info["fingerprint"] == fingerprint(net)
    assert info["version"] == __version__
    with pytest.raises(ValueError, match="Parameter 'path': no file at"):
        read_fit_info(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(
        ValueError, match="Parameter 'path': .*other.pt is not a fit saved by influx"
    ):
        read_fit_info(tmp_path / "other.pt")


# --- the fingerprint covers every tensor the influences depend on, and the loss ------------


def _head_on_backbone(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh())
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    return torch.nn.Sequential(backbone, torch.nn.Linear(6, 3)).eval()


def test_a_fit_on_another_frozen_backbone_is_refused(tmp_path: Path) -> None:
    x, y = classification_data()
    path = DirectInfluence(_head_on_backbone(1), F.cross_entropy, 0.1).fit(loader(x, y))
    path = path.save(tmp_path / "fit.pt")
    other = DirectInfluence(_head_on_backbone(2), F.cross_entropy, 0.1)
    with pytest.raises(ValueError, match="other values of this model's frozen parameters or"):
        other.load_fit(path)
    DirectInfluence(_head_on_backbone(1), F.cross_entropy, 0.1).load_fit(path)


def test_a_fit_with_other_batch_norm_statistics_is_refused(tmp_path: Path) -> None:
    x, y = classification_data()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    path = DirectInfluence(net.eval(), F.cross_entropy, 0.1).fit(loader(x, y)).save(tmp_path / "f")
    net.train()(x)  # updates the running statistics only
    with pytest.raises(ValueError, match="BatchNorm running statistics"):
        DirectInfluence(net.eval(), F.cross_entropy, 0.1).load_fit(path)


def test_a_fit_with_another_loss_is_refused(tmp_path: Path) -> None:
    x, y = classification_data()
    net = make_mlp().eval()
    plain = torch.nn.CrossEntropyLoss()
    path = DirectInfluence(net, plain, 0.1).fit(loader(x, y)).save(tmp_path / "fit.pt")
    DirectInfluence(net, torch.nn.CrossEntropyLoss(), 0.1).load_fit(path)
    smoothed = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"another loss: .*'label_smoothing': 0\.1"):
        DirectInfluence(net, smoothed, 0.1).load_fit(path)
    with pytest.raises(ValueError, match="another loss"):
        DirectInfluence(net, F.cross_entropy, 0.1).load_fit(path)
    partial = functools.partial(F.cross_entropy, label_smoothing=0.0)
    path = DirectInfluence(net, partial, 0.1).fit(loader(x, y)).save(tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="label_smoothing"):
        DirectInfluence(net, functools.partial(F.cross_entropy, label_smoothing=0.2), 0.1).load_fit(
            path
        )


def test_closures_are_declared_the_same_loss_by_their_loss_id(tmp_path: Path) -> None:
    x, y = classification_data()
    net = make_mlp().eval()

    def closure(scale: float):
        def loss(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return scale * F.cross_entropy(outputs, target)

        loss.loss_id = f"scaled-ce-{scale}"  # type: ignore[attr-defined]
        return loss

    path = DirectInfluence(net, closure(1.0), 0.1).fit(loader(x, y)).save(tmp_path / "fit.pt")
    DirectInfluence(net, closure(1.0), 0.1).load_fit(path)
    with pytest.raises(ValueError, match="scaled-ce-2.0"):
        DirectInfluence(net, closure(2.0), 0.1).load_fit(path)
