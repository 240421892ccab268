"""`influx evaluate` on a ridge model written into tmp_path: its LDS is the library's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from evaluation_ridge import RidgeProblem

import torch
from influx.cli import main
from influx.evaluation import retrain_on_subsets

MODULE = """
import torch


def make_net():
    return torch.nn.Linear(3, 1, bias=False).double()


def train(model, dataset, seed):
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.stack([dataset[i][1] for i in range(len(dataset))])
    a = x.T @ x + 1.0 * torch.eye(3, dtype=x.dtype)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.solve(a, x.T @ y).T)
    return model


def returns_a_string(model, dataset, seed):
    return "trained"
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    problem = RidgeProblem(n=40, alpha=1.0, test_offset=2.0)
    (tmp_path / "evaluate_cli_model.py").write_text(MODULE)
    torch.save((torch.tensor(problem.x), torch.tensor(problem.y)[:, None]), tmp_path / "train.pt")
    torch.save(
        (torch.tensor(problem.x_test), torch.tensor(problem.y_test)[:, None]), tmp_path / "test.pt"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _arguments(*extra: str) -> list:
    return [
        "evaluate",
        "--model",
        "evaluate_cli_model:make_net",
        "--train-fn",
        "evaluate_cli_model:train",
        "--train",
        "train.pt",
        "--test",
        "test.pt",
        "--loss",
        "mse",
        "--regularization",
        "0.05",  # 2 alpha / n: the Hessian of the ridge objective
        "--subsets",
        "20",
        *extra,
    ]


def test_prints_the_lds_of_each_method_and_resumes_from_its_store(
    workdir: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    problem = RidgeProblem(n=40, alpha=1.0, test_offset=2.0)
    expected = retrain_on_subsets(
        problem.train, problem.measure, 40, n_subsets=20, progress=False
    ).lds(problem.influence())
    code = main(_arguments("--methods", "direct,cg", "--store", "truth.zarr"))
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["direct", "cg"]
    values = [float(re.search(r"LDS (-?\d\.\d{4})", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert values[0] == pytest.approx(expected.mean, abs=5e-5)
    assert values[1] == pytest.approx(expected.mean, abs=5e-5)
    assert "lambda = 0.05, 6 test points" in lines[0]
    assert "Ground truth: 20 subsets of 50% of the 40 training points" in caplog.text
    assert (workdir / "truth.zarr").is_dir()

    caplog.clear()
    code = main(_arguments("--methods", "direct", "--store", "truth.zarr"))
    again, err = capsys.readouterr()
    assert code == 0
    assert "Resuming from" in caplog.text and "20 of 20 retrainings are done" in caplog.text
    assert again.split(" (")[0] == lines[0].split(" (")[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "direct,exact"], "--methods: expected comma-separated names among direct,"),
        (["--methods", "cg,cg"], "--methods: names a method twice: 'cg,cg'"),
        (["--fraction", "1.5"], "--fraction: must be strictly between 0 and 1, got 1.5"),
        (["--subsets", "1"], "--subsets: must be an integer >= 2, got 1"),
        (["--seeds", "0,x"], "--seeds: expected comma-separated integers, got '0,x'"),
        (["--weights", "missing.pt"], "--weights: no such file or directory: 'missing.pt'"),
        (["--train-fn", "evaluate_cli_model"], "--train-fn: expected PKG.MODULE:FUNCTION"),
        (
            ["--train-fn", "evaluate_cli_model:fit"],
            "--train-fn: module 'evaluate_cli_model' has no attribute 'fit'",
        ),
    ],
)
def test_usage_errors_exit_with_code_2(
    workdir: Path, capsys: pytest.CaptureFixture, extra: list, message: str
) -> None:
    assert main(_arguments(*extra)) == 2
    assert message in capsys.readouterr().err


def test_a_store_of_other_settings_is_a_usage_error(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(_arguments("--store", "truth.zarr")) == 0
    assert main(_arguments("--store", "truth.zarr", "--fraction", "0.25")) == 2
    err = capsys.readouterr().err
    assert (
        "--store: Parameter 'store'" in err and "fraction=0.5, this call has fraction=0.25" in err
    )


def test_a_train_fn_returning_no_model_is_an_error(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    arguments = _arguments()
    arguments[arguments.index("evaluate_cli_model:train")] = "evaluate_cli_model:returns_a_string"
    assert main(arguments) == 1
    assert "must train the model in place or return a torch.nn.Module, returned a str" in (
        capsys.readouterr().err
    )


def test_the_measured_losses_are_the_test_squared_errors(workdir: Path) -> None:
    from influx.cli.evaluate import Retrainer, TestLosses
    from influx.cli.loading import load_data, resolve_object

    problem = RidgeProblem(n=40, alpha=1.0, test_offset=2.0)
    train = load_data("train.pt", "--train", torch.float64)
    test = load_data("test.pt", "--test", torch.float64)
    retrain = Retrainer(
        resolve_object("evaluate_cli_model:make_net", "--model"),
        resolve_object("evaluate_cli_model:train", "--train-fn"),
        train,
    )
    indices = np.arange(0, 40, 3)
    losses = TestLosses(test, torch.nn.functional.mse_loss, "mse", 4)(retrain(indices, 0))
    np.testing.assert_allclose(losses, problem.measure(problem.train(indices, 0)), rtol=1e-10)
