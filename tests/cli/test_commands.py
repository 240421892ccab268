"""`influx rank`, `matrix`, `info` and `status` end to end, through a subprocess, on a model
factory module and data files written into tmp_path."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Sequence

import numpy as np
import pytest
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.cli import main
from influx.cli.common import UsageError
from influx.cli.loading import load_data, resolve_object
from influx.cli.matrix import recorded_command
from influx.cli.methods import METHODS, parse_options
from influx.cli.rank import write_ranking
from influx.torch import CgInfluence, DirectInfluence, rank_training_points
from influx.torch.composition.persistence import fingerprint

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cli"
SUBCOMMANDS = ["demo", "rank", "matrix", "info", "status"]

NET_MODULE = """
import torch


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()


def make_wide_net():
    return torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()


def test_set():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def make_regressor():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()


def broken_loss(prediction, target):
    raise RuntimeError("the loss failed")
"""


def influx(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m influx ARGS` in `cwd` with this worktree's sources."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "influx", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def fields(stdout: str) -> Dict[str, str]:
    """The `key: value` lines of a report."""
    return {
        key.strip(): value.strip()
        for key, sep, value in (line.partition(":") for line in stdout.splitlines())
        if sep
    }


def import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A factory module, weights, 20 training points (float32 inputs and int32 labels in a
    dict, converted by the command line), labels-free data and a mismatched state dict."""
    (tmp_path / "cli_test_net.py").write_text(NET_MODULE)
    module = import_file(tmp_path / "cli_test_net.py", "cli_test_net_in_tests")
    torch.save(module.make_net().state_dict(), tmp_path / "weights.pt")
    torch.save(module.make_wide_net().state_dict(), tmp_path / "wide.pt")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=generator)
    y = (x[:, 1] > 0).int()
    torch.save({"inputs": x.float(), "labels": y}, tmp_path / "train.pt")
    torch.save({"x": x}, tmp_path / "inputs_only.pt")
    return tmp_path


def _api_model(
    module: ModuleType, weights: Path, x: torch.Tensor, y: torch.Tensor
) -> DirectInfluence:
    net = module.make_net()
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    return DirectInfluence(net, torch.nn.functional.cross_entropy, regularization=0.01).fit(
        DataLoader(TensorDataset(x, y), batch_size=256)
    )


@pytest.mark.slow
def test_documented_example_matches_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commands of docs/cli.md (examples/cli/commands.sh), run as documented: `rank` gives
    the API's ranking, `matrix` the in-memory matrix, `info` and `status` their fields."""
    for name in ("tiny_model.py", "prepare.py"):
        (tmp_path / name).write_text((EXAMPLE / name).read_text())
    text = (EXAMPLE / "commands.sh").read_text().replace("\\\n", " ")
    commands = [
        shlex.split(line.split("#")[0]) for line in text.splitlines() if line.split("#")[0].strip()
    ]
    assert [c[:2] for c in commands] == [
        ["python", "prepare.py"],
        ["influx", "rank"],
        ["influx", "info"],
        ["influx", "matrix"],
        ["influx", "status"],
    ]
    assert '--8<-- "examples/cli/commands.sh"' in (ROOT / "docs" / "cli.md").read_text()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tiny_model", raising=False)
    runpy.run_path(str(tmp_path / "prepare.py"), run_name="__main__")
    outputs = []
    for command in commands[1:]:
        result = influx(command[1:], tmp_path)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    rank_out, info_out, _, status_out = outputs

    tiny_model = sys.modules["tiny_model"]
    x, y = torch.load(tmp_path / "train.pt", weights_only=True)
    validation = np.load(tmp_path / "validation.npz")
    x_val, y_val = torch.from_numpy(validation["x"]), torch.from_numpy(validation["y"])
    net = tiny_model.make_model()
    net.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    model = DirectInfluence(net.eval(), torch.nn.functional.cross_entropy, 0.01).fit(
        DataLoader(TensorDataset(x, y), batch_size=256)
    )
    expected = rank_training_points(
        model,
        DataLoader(TensorDataset(x, y), batch_size=256),
        DataLoader(TensorDataset(x_val, y_val), batch_size=256),
    )
    with open(tmp_path / "ranking.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["rank"]) for r in rows] == list(range(1, 121))
    assert [int(r["index"]) for r in rows] == expected.indices.tolist()
    np.testing.assert_allclose(
        [float(r["influence"]) for r in rows],
        expected.values[expected.indices].numpy(),
        rtol=1e-9,
        atol=1e-12,
    )
    top8 = [int(line.split()[1]) for line in rank_out.splitlines()[3:11]]
    assert top8 == expected.indices[:8].tolist()
    flipped = {int(i) for i in (tmp_path / "flipped.txt").read_text().split()}
    assert len(flipped & set(top8)) >= 4  # what the docs page says: 5 of 6
    assert "model: direct/cholesky, converged" in rank_out

    info = fields(info_out)
    assert info["class"] == "DirectInfluence"
    assert info["parameters"] == "67"
    assert info["blocks"] == "1: model (67)"
    assert info["fingerprint"] == fingerprint(net)
    assert info["version"] == "influx 0.1.0"
    assert info["regularization"] == "0.01"

    import zarr

    stored = zarr.open_array(str(tmp_path / "influences.zarr"), mode="r")[...]
    np.testing.assert_allclose(
        stored, model.influences(x_val, y_val, x, y).numpy(), rtol=1e-9, atol=1e-12
    )
    status = fields(status_out)
    assert status["shape"] == "(40, 120) float64"
    assert status["mode"] == "up"
    assert status["chunks"] == "8 of 8 done"
    assert status["complete"] == "yes"
    assert status["created by"] == shlex.join(commands[3])


@pytest.mark.slow
def test_matrix_interrupted_resumes_to_the_in_memory_matrix(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A run stopped after 4 chunks, continued by the command `status` prints (stopped again),
    finished on a local Dask cluster: the matrix equals the API's, the test set coming from
    a dataset factory."""
    base = [
        "matrix",
        "--model",
        "cli_test_net:make_net",
        "--weights",
        "weights.pt",
        "--train",
        "train.pt",
        "--test",
        "cli_test_net:test_set",
        "--batch-size",
        "4",
        "--out",
        "m.zarr",
    ]
    first = influx([*base, "--max-chunks", "4", "--no-progress"], project)
    assert first.returncode == 0, first.stderr
    assert "4 of 15 chunks of m.zarr done" in first.stdout
    status = influx(["status", "m.zarr"], project)
    assert status.returncode == 0, status.stderr
    report = fields(status.stdout)
    assert report["chunks"] == "4 of 15 done"
    assert report["complete"] == "no"
    assert report["shape"] == "(9, 20) float64"
    assert report["created by"] == shlex.join(["influx", *base])
    resume = shlex.split(report["resume with"])
    assert resume[:3] == ["cd", str(project), "&&"] and resume[3:] == ["influx", *base]
    # continued in this process (torch is imported already), stopped again
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "cli_test_net", raising=False)
    assert main([*resume[4:], "--max-chunks", "5", "--no-progress"]) == 0
    assert "9 of 15 chunks" in capsys.readouterr().out
    sys.modules.pop("cli_test_net", None)
    third = influx([*resume[4:], "--workers", "1", "--no-progress"], project)
    assert third.returncode == 0, third.stderr
    assert "15 of 15 chunks done, complete" in third.stdout

    import zarr

    module = import_file(project / "cli_test_net.py", "cli_test_net_matrix")
    train = torch.load(project / "train.pt", weights_only=True)
    x, y = train["inputs"].double(), train["labels"].long()
    test = module.test_set()
    x_test, y_test = test.tensors
    model = _api_model(module, project / "weights.pt", x, y)
    stored = zarr.open_array(str(project / "m.zarr"), mode="r")
    np.testing.assert_allclose(
        stored[...], model.influences(x_test, y_test, x, y).numpy(), rtol=1e-9, atol=1e-12
    )
    assert stored.attrs["influx"]["complete"]


def _one_line_error(result: subprocess.CompletedProcess, argument: str) -> str:
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("influx rank: error: ") and argument in last, result.stderr
    return last


def test_usage_errors_exit_2_naming_the_argument(project: Path) -> None:
    base = {
        "--model": "cli_test_net:make_net",
        "--weights": "weights.pt",
        "--train": "train.pt",
        "--validation": "train.pt",
    }

    def rank(**changes: str) -> subprocess.CompletedProcess:
        options = {**base, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
        return influx(["rank", *[item for pair in options.items() for item in pair]], project)

    missing = _one_line_error(rank(weights="missing.pt"), "--weights")
    assert "no such file or directory: 'missing.pt'" in missing
    assert len(rank(train="absent.npz").stderr.strip().splitlines()) == 1
    bad_path = _one_line_error(rank(model="cli_test_net.make_net"), "--model")
    assert "expected PKG.MODULE:FACTORY" in bad_path and "'cli_test_net.make_net'" in bad_path
    mismatch = rank(model="cli_test_net:make_wide_net")
    assert len(mismatch.stderr.strip().splitlines()) == 1
    message = _one_line_error(mismatch, "--weights")
    assert "does not match the model of cli_test_net:make_wide_net" in message
    assert "0.weight (4, 3) instead of (6, 3)" in message
    no_labels = rank(train="inputs_only.pt")
    assert len(no_labels.stderr.strip().splitlines()) == 1
    message = _one_line_error(no_labels, "--train")
    assert "'inputs_only.pt' has no labels" in message
    method = _one_line_error(rank(method="newton"), "--method")
    assert "invalid choice: 'newton'" in method
    if importlib.util.find_spec("pyarrow") is None:
        parquet = _one_line_error(rank(out="ranking.parquet"), "--out")
        assert "needs pyarrow" in parquet


def test_rank_with_options_matches_the_api_method(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """In this process: `--method cg --option ...` ranks as CgInfluence with those settings,
    and `--fit-out` saves a fit that `info` describes."""
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "cli_test_net", raising=False)
    args = ["rank", "--model", "cli_test_net:make_net", "--weights", "weights.pt"]
    args += ["--train", "train.pt", "--validation", "cli_test_net:test_set", "--top", "3"]
    args += ["--method", "cg", "--regularization", "0.5", "--option", "rtol=1e-12"]
    args += ["--option", "atol=1e-14", "--batch-size", "8", "--out", "r.json"]
    assert main([*args, "--fit-out", "cg.fit"]) == 0
    out = capsys.readouterr().out
    assert "CgInfluence (--method cg, --loss cross_entropy, lambda = 0.5)" in out
    assert "model: cg, converged" in out
    records = json.loads((project / "r.json").read_text())
    sys.modules.pop("cli_test_net", None)

    module = import_file(project / "cli_test_net.py", "cli_test_net_rank")
    train = torch.load(project / "train.pt", weights_only=True)
    train_loader = DataLoader(
        TensorDataset(train["inputs"].double(), train["labels"].long()), batch_size=8
    )
    net = module.make_net()
    net.load_state_dict(torch.load(project / "weights.pt", weights_only=True))
    model = CgInfluence(
        net.eval(), torch.nn.functional.cross_entropy, 0.5, rtol=1e-12, atol=1e-14
    ).fit(train_loader)
    expected = rank_training_points(
        model, train_loader, DataLoader(module.test_set(), batch_size=8)
    )
    assert [r["index"] for r in records] == expected.indices.tolist()
    np.testing.assert_allclose(
        [r["influence"] for r in records], expected.values[expected.indices], rtol=1e-8
    )
    assert main(["info", "cg.fit"]) == 0
    info = fields(capsys.readouterr().out)
    assert info["class"] == "CgInfluence" and info["rtol"] == "1e-12"
    assert info["regularization"] == "0.5" and info["parameters"] == "26"


def test_computation_error_exits_1_traceback_with_debug(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "rank",
        "--model",
        "cli_test_net:make_net",
        "--weights",
        "weights.pt",
        "--train",
        "train.pt",
        "--validation",
        "train.pt",
        "--loss",
        "cli_test_net:broken_loss",
    ]
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "cli_test_net", raising=False)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the loss's own error, put into context by the first-batch check of fit
    assert err[-1].startswith("influx rank: error: ValueError: The model and loss could not")
    assert err[-1].endswith("the loss failed (--debug shows the traceback)")
    assert not any("Traceback" in line for line in err)
    sys.modules.pop("cli_test_net", None)
    debug = influx([*args, "--debug"], project)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    last = debug.stderr.strip().splitlines()[-1]
    assert last.startswith("influx rank: error: ValueError:")
    assert last.endswith("the loss failed")


def test_version_and_plain_help(tmp_path: Path) -> None:
    version = influx(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == "influx 0.1.0"
    for args in [["--help"], *[[command, "--help"] for command in SUBCOMMANDS]]:
        result = influx(args, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "usage: influx" in result.stdout
        assert "][" not in result.stdout, args
    assert all(name in influx(["--help"], tmp_path).stdout for name in SUBCOMMANDS)
    rank_help = influx(["rank", "--help"], tmp_path).stdout
    assert all(name in rank_help for name in METHODS)


def test_missing_fit_and_store_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(tmp_path / "fit.pt")]) == 2
    assert "influx info: error: FIT: no such file or directory" in capsys.readouterr().err
    (tmp_path / "not-a-fit.pt").write_bytes(b"nothing")
    assert main(["info", str(tmp_path / "not-a-fit.pt")]) == 2
    assert "is not a fit saved by influx" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "m.zarr")]) == 2
    assert "influx status: error: STORE: no such file or directory" in capsys.readouterr().err


def test_data_forms_are_read_as_labelled_pairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array([0, 1, 0, 1, 1, 0], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.savez(tmp_path / "renamed.npz", inputs=x, labels=y)
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), tmp_path / "pair.pt")
    torch.save([torch.from_numpy(x), torch.from_numpy(y)], tmp_path / "list.pt")
    torch.save(torch.from_numpy(x), tmp_path / "tensor.pt")
    torch.save((torch.from_numpy(x), torch.from_numpy(y[:4])), tmp_path / "short.pt")
    (tmp_path / "cli_data_forms.py").write_text(
        "import numpy as np, torch\n"
        "X = np.arange(12, dtype=np.float32).reshape(6, 2)\n"
        "def pair():\n    return X, np.zeros(6, dtype=np.int64)\n"
        "def dataset():\n    return torch.utils.data.TensorDataset(torch.from_numpy(X))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("d.npz", "renamed.npz", "pair.pt", "list.pt", "cli_data_forms:pair"):
        data = load_data(name, "--train", torch.float64)
        assert isinstance(data, TensorDataset)
        inputs, labels = data.tensors
        assert inputs.dtype == torch.float64 and labels.dtype == torch.int64, name
        np.testing.assert_array_equal(inputs.numpy(), x)
    with pytest.raises(UsageError, match=r"^--train: 'tensor.pt' holds a Tensor without labels"):
        load_data("tensor.pt", "--train", torch.float64)
    with pytest.raises(UsageError, match=r"^--test: inputs and labels must have the same number"):
        load_data("short.pt", "--test", torch.float64)
    with pytest.raises(UsageError, match=r"^--test: the items of the dataset of .* without labels"):
        load_data("cli_data_forms:dataset", "--test", torch.float64)
    with pytest.raises(UsageError, match=r"^--model: module 'cli_data_forms' has no attribute 'f'"):
        resolve_object("cli_data_forms:f", "--model")
    with pytest.raises(UsageError, match=r"^--loss: cannot import module 'no_such_module'"):
        resolve_object("no_such_module:f", "--loss")
    with pytest.raises(UsageError, match=r"^--train: cannot read 'd.txt': expected a \.pt"):
        (tmp_path / "d.txt").write_text("1 2")
        load_data("d.txt", "--train", torch.float64)


def test_options_recorded_command_and_json_ranking(tmp_path: Path) -> None:
    assert parse_options(["rank=20", "rtol=1e-9", "fisher=true_fisher"]) == {
        "rank": 20,
        "rtol": 1e-9,
        "fisher": "true_fisher",
    }
    assert all(isinstance(m.model_class(), type) for m in METHODS.values())
    with pytest.raises(UsageError, match=r"^--option: expected KEY=VALUE"):
        parse_options(["rank"])
    argv: List[str] = ["matrix", "--out", "a b.zarr", "--max-chunks", "3", "--no-progress"]
    assert (
        recorded_command([*argv, "--max-chunks=2", "--debug"]) == "influx matrix --out 'a b.zarr'"
    )
    out = write_ranking([2, 0, 1], [0.5, 1.5, -2.0], tmp_path / "r.json")
    assert json.loads(out.read_text()) == [
        {"rank": 1, "index": 2, "influence": -2.0},
        {"rank": 2, "index": 0, "influence": 0.5},
        {"rank": 3, "index": 1, "influence": 1.5},
    ]


def test_parquet_ranking(tmp_path: Path) -> None:
    parquet = pytest.importorskip("pyarrow.parquet")
    out = write_ranking([1, 0], [0.25, -1.0], tmp_path / "r.parquet")
    assert parquet.read_table(out).to_pylist() == [
        {"rank": 1, "index": 1, "influence": -1.0},
        {"rank": 2, "index": 0, "influence": 0.25},
    ]


def _in_process(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "cli_test_net", raising=False)


def test_rank_chooses_mse_for_float_targets_of_the_output_shape(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A one-output regression net with (N, 1) float targets: cross-entropy has a zero
    gradient there (every influence 0, a ranking in index order); auto takes mse, says so,
    and ranks as DirectInfluence with mse_loss."""
    _in_process(project, monkeypatch)
    module = import_file(project / "cli_test_net.py", "cli_test_net_regression")
    torch.save(module.make_regressor().state_dict(), project / "regressor.pt")
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    y = x[:, :1] ** 2
    torch.save((x, y), project / "regression.pt")
    torch.save((x[:5], y[:5]), project / "regression_val.pt")
    args = ["rank", "--model", "cli_test_net:make_regressor", "--weights", "regressor.pt"]
    args += ["--train", "regression.pt", "--validation", "regression_val.pt", "--top", "12"]
    with caplog.at_level(logging.INFO, logger="influx.cli"):
        assert main([*args, "--out", "r.json"]) == 0
    assert (
        "--loss auto: the targets are floats of the model's output shape (1,), so the loss is mse"
        in caplog.text
    )
    assert "--loss mse" in capsys.readouterr().out
    net = module.make_regressor()
    net.load_state_dict(torch.load(project / "regressor.pt", weights_only=True))
    expected = rank_training_points(
        DirectInfluence(net, torch.nn.functional.mse_loss, 0.01).fit(
            DataLoader(TensorDataset(x, y), 256)
        ),
        DataLoader(TensorDataset(x, y), 256),
        DataLoader(TensorDataset(x[:5], y[:5]), 256),
    )
    records = json.loads((project / "r.json").read_text())
    assert [r["index"] for r in records] == expected.indices.tolist()
    assert any(abs(r["influence"]) > 1e-6 for r in records)


def test_validation_of_the_wrong_width_fails_before_the_fit(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _in_process(project, monkeypatch)
    torch.save((torch.randn(6, 5), torch.zeros(6, dtype=torch.long)), project / "wide_val.pt")
    args = ["rank", "--model", "cli_test_net:make_net", "--weights", "weights.pt"]
    args += ["--train", "train.pt", "--validation", "wide_val.pt"]
    with caplog.at_level(logging.INFO, logger="influx.cli"):
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "--validation: the model cannot be evaluated on its first points" in err
    assert "inputs (2, 5)" in err
    assert "Fitting" not in caplog.text  # refused before the fit


def test_rank_with_automatic_regularization_prints_the_chosen_lambda(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "cli_test_net", raising=False)
    args = ["rank", "--model", "cli_test_net:make_net", "--weights", "weights.pt"]
    args += ["--train", "train.pt", "--validation", "cli_test_net:test_set", "--top", "2"]
    assert main([*args, "--regularization", "auto"]) == 0
    out = capsys.readouterr().out
    assert "lambda = auto)" in out
    chosen = re.search(r"model: direct/\w+, converged, lambda = ([0-9.e+-]+)", out)
    assert chosen is not None and float(chosen.group(1)) > 0
    sys.modules.pop("cli_test_net", None)
    assert main([*args, "--regularization", "-1"]) == 2
    assert "--regularization: must be >= 0 or auto, got -1.0" in capsys.readouterr().err
