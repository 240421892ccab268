"""`influx evaluate`: does influence predict retraining on your model? The LDS of each method.

The ground truth is the user's own training: `--train-fn PKG.MODULE:FUNCTION` is called as
`train_fn(model, dataset, seed)` on a fresh network of `--model` (built after
`torch.manual_seed(seed)`), a `torch.utils.data.Subset` of the training data and the seed; it
trains the network in place and returns it (or None). The command retrains on random
subsets ([retrain_on_subsets][influx.evaluation.retrain_on_subsets], resumable with
`--store`), measures the loss of every test point, fits each method of `--methods` to the
model trained on all the training points (or to `--weights`), and prints the linear
datamodeling score of each ([lds][influx.evaluation.lds]), one line per method.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Tuple

from .common import UsageError, echo, require_file
from .fitting import (
    DEFAULT_REGULARIZATION,
    check_regularization_argument,
    data_loader,
    lambda_text,
    regularization_argument,
)
from .loading import (
    LOSSES,
    check_data_argument,
    check_object_path,
    load_data,
    load_loss,
    load_model,
    resolve_object,
)
from .methods import METHODS, build_influence_model, parse_options

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from torch.utils.data import Dataset

    import torch

__all__ = ["EVALUATE_DESCRIPTION", "add_evaluate_parser", "run_evaluate"]

logger = logging.getLogger(__name__)

EVALUATE_DESCRIPTION = (
    "Check whether influence predicts retraining on your model: retrain it with --train-fn on "
    "random subsets of the training data (the ground truth, resumable with --store), measure "
    "the loss of every test point, and print the linear datamodeling score (LDS: the mean over "
    "test points of the Spearman correlation between the measured losses and the influence "
    "predictions -sum_{j in S} I(z'_i, z_j)) of each method in --methods, one line each. "
    "1 is perfect, 0 is no better than chance."
)


def add_evaluate_parser(sub: Any, parents: List[argparse.ArgumentParser]) -> None:
    """Register the `evaluate` subcommand on the subparsers `sub`."""
    parser = sub.add_parser(
        "evaluate",
        help="the LDS of influence methods against retraining on subsets",
        description=EVALUATE_DESCRIPTION,
        parents=list(parents),
    )
    group = parser.add_argument_group("model, training and data")
    group.add_argument(
        "--model",
        required=True,
        metavar="PKG.MODULE:FACTORY",
        help="a function called without arguments that returns a fresh network",
    )
    group.add_argument(
        "--train-fn",
        required=True,
        metavar="PKG.MODULE:FUNCTION",
        help="train_fn(model, dataset, seed): trains the fresh network on the dataset (a torch "
        "Subset of the training data) in place and returns it (or None)",
    )
    group.add_argument(
        "--train", required=True, metavar="TRAIN", help="the training data (as for influx rank)"
    )
    group.add_argument(
        "--test", required=True, metavar="TEST", help="the test points, in the same forms"
    )
    group.add_argument(
        "--loss",
        default="cross_entropy",
        metavar="LOSS",
        help=f"{' or '.join(LOSSES)} or PKG.MODULE:FUNCTION (default: cross_entropy); the "
        "influence's loss and the measured test loss",
    )
    group.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="W.pt",
        help="the model trained on all points to compute influence on (default: train it with "
        "--train-fn and the first seed)",
    )
    group = parser.add_argument_group("influence methods")
    group.add_argument(
        "--methods",
        default="direct",
        metavar="M1,M2",
        help=f"comma-separated methods among {', '.join(METHODS)} (default: direct)",
    )
    group.add_argument(
        "--regularization",
        type=regularization_argument,
        default=DEFAULT_REGULARIZATION,
        metavar="LAMBDA",
        help="lambda of every method, or 'auto' (default: %(default)s)",
    )
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further argument of every method's class (repeatable)",
    )
    group = parser.add_argument_group("ground truth")
    group.add_argument(
        "--subsets", type=int, default=100, metavar="M", help="subsets (default: 100)"
    )
    group.add_argument(
        "--fraction",
        type=float,
        default=0.5,
        help="fraction of the training points in each subset (default: 0.5)",
    )
    group.add_argument(
        "--seeds",
        default="0",
        metavar="S1,S2",
        help="comma-separated training seeds per subset; the losses are averaged (default: 0)",
    )
    group.add_argument(
        "--subset-seed", type=int, default=0, help="seed of the subsets' draw (default: 0)"
    )
    group.add_argument(
        "--store",
        type=Path,
        default=None,
        metavar="OUT.zarr",
        help="write the retrainings to this zarr store as they complete and resume from it",
    )
    group.add_argument(
        "--batch-size", type=int, default=256, metavar="B", help="points per batch (default: 256)"
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="show progress bars",
    )
    parser.set_defaults(run=run_evaluate)


def _methods(value: str) -> List[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if not names or unknown:
        raise UsageError(
            "--methods",
            f"expected comma-separated names among {', '.join(METHODS)}, got {value!r}",
        )
    if len(set(names)) != len(names):
        raise UsageError("--methods", f"names a method twice: {value!r}")
    return names


def _seeds(value: str) -> Tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in value.split(","))
    except ValueError:
        raise UsageError("--seeds", f"expected comma-separated integers, got {value!r}") from None
    if len(set(seeds)) != len(seeds):
        raise UsageError("--seeds", f"names a seed twice: {value!r}")
    return seeds


def _check_arguments(args: argparse.Namespace) -> None:
    check_object_path(args.model, "--model")
    check_object_path(args.train_fn, "--train-fn", "FUNCTION")
    check_data_argument(args.train, "--train")
    check_data_argument(args.test, "--test")
    if args.loss not in LOSSES:
        check_object_path(args.loss, "--loss", "FUNCTION")
    if args.weights is not None:
        require_file(args.weights, "--weights")
    args.method_names = _methods(args.methods)
    args.seed_values = _seeds(args.seeds)
    if args.subsets < 2:
        raise UsageError("--subsets", f"must be an integer >= 2, got {args.subsets}")
    if not 0 < args.fraction < 1:
        raise UsageError("--fraction", f"must be strictly between 0 and 1, got {args.fraction}")
    check_regularization_argument(args.regularization)
    if args.batch_size < 1:
        raise UsageError("--batch-size", f"must be a positive integer, got {args.batch_size}")
    parse_options(args.option)


class Retrainer:
    """`train_fn(indices, seed)` of the evaluation from the user's factory and training
    function."""

    def __init__(self, factory: Callable[[], Any], train_fn: Callable[..., Any], train: Any):
        self.factory, self.train_fn, self.train = factory, train_fn, train

    def __call__(self, indices: "np.ndarray", seed: int) -> "torch.nn.Module":
        from torch.utils.data import Subset

        import torch

        torch.manual_seed(seed)
        model = self.factory()
        trained = self.train_fn(model, Subset(self.train, indices.tolist()), seed)
        result = model if trained is None else trained
        if not isinstance(result, torch.nn.Module):
            raise TypeError(
                f"--train-fn must train the model in place or return a torch.nn.Module, "
                f"returned a {type(result).__name__}"
            )
        return result.eval()


class TestLosses:
    """`measure_fn(model)`: the loss of each test point."""

    def __init__(self, test: "Dataset", loss: Callable[..., Any], loss_name: str, batch_size: int):
        self.test, self.loss, self.loss_name, self.batch_size = test, loss, loss_name, batch_size

    def __call__(self, model: "torch.nn.Module") -> "np.ndarray":
        import torch

        values = []
        with torch.no_grad():
            for x, y in data_loader(self.test, self.batch_size):
                prediction = model(x)
                if self.loss_name in LOSSES:
                    per_point = self.loss(prediction, y, reduction="none")
                    values.append(per_point.reshape(per_point.shape[0], -1).mean(dim=1))
                else:
                    values.append(
                        torch.stack(
                            [
                                self.loss(prediction[i : i + 1], y[i : i + 1]).reshape(())
                                for i in range(prediction.shape[0])
                            ]
                        )
                    )
        return torch.cat(values).double().cpu().numpy()


def _influence_matrix(model: Any, train: "Dataset", test: "Dataset", batch_size: int) -> Any:
    import torch

    rows = []
    for x_test, y_test in data_loader(test, batch_size):
        factors = model.influence_factors(x_test, y_test)
        rows.append(
            torch.cat(
                [
                    model.influences_from_factors(factors, x, y)
                    for x, y in data_loader(train, batch_size)
                ],
                dim=1,
            )
        )
    return torch.cat(rows, dim=0)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run `influx evaluate` with the parsed arguments `args`."""
    _check_arguments(args)
    import numpy as np

    import torch

    from ..evaluation import lds, retrain_on_subsets

    factory = resolve_object(args.model, "--model")
    train_fn = resolve_object(args.train_fn, "--train-fn", "FUNCTION")
    for name, value in (("--model", factory), ("--train-fn", train_fn)):
        if not callable(value):
            raise UsageError(name, f"{getattr(args, name[2:].replace('-', '_'))} is not callable")
    loss = load_loss(args.loss)
    try:
        probe = factory()
    except Exception as error:  # noqa: BLE001 - any failure of user code names the argument
        raise UsageError(
            "--model", f"calling {args.model}() failed: {type(error).__name__}: {error}"
        ) from error
    parameters = list(probe.parameters()) if isinstance(probe, torch.nn.Module) else []
    if not parameters:
        raise UsageError(
            "--model",
            f"{args.model}() must return a torch.nn.Module with parameters, got "
            f"{type(probe).__name__}",
        )
    dtype = parameters[0].dtype
    train = load_data(args.train, "--train", dtype)
    test = load_data(args.test, "--test", dtype)
    n_train = len(train)  # type: ignore[arg-type]
    retrain = Retrainer(factory, train_fn, train)
    measure = TestLosses(test, loss, args.loss, args.batch_size)
    if args.weights is not None:
        network = load_model(args.model, args.weights)
    else:
        logger.info(
            "Training the model on all %d training points (seed %d).", n_train, args.seed_values[0]
        )
        network = retrain(np.arange(n_train), args.seed_values[0])
    logger.info(
        "Ground truth: %d subsets of %d%% of the %d training points, %d seed(s) each%s.",
        args.subsets,
        round(100 * args.fraction),
        n_train,
        len(args.seed_values),
        "" if args.store is None else f", stored in {args.store}",
    )
    try:
        truth = retrain_on_subsets(
            retrain,
            measure,
            n_train,
            n_subsets=args.subsets,
            fraction=args.fraction,
            seeds=args.seed_values,
            store=args.store,
            progress=args.progress,
            subset_seed=args.subset_seed,
        )
    except ValueError as error:
        if str(error).startswith("Parameter 'store'"):
            raise UsageError("--store", str(error)) from None
        if str(error).startswith("Parameter 'fraction'"):
            raise UsageError("--fraction", str(error)) from None
        raise
    options = parse_options(args.option)
    for name in args.method_names:
        start = time.perf_counter()
        model = build_influence_model(
            METHODS[name], network, loss, args.regularization, options, progress=args.progress
        )
        torch.manual_seed(args.seed_values[0])
        model.fit(data_loader(train, args.batch_size))
        scores = _influence_matrix(model, train, test, args.batch_size)
        result = lds(scores, truth.subsets, truth.outputs)
        seconds = time.perf_counter() - start
        left_out = (
            f", {result.n_undefined} with constant losses left out" if result.n_undefined else ""
        )
        echo(
            f"{name}: LDS {result.mean:.4f} (lambda = {lambda_text(args.regularization)}, "
            f"{len(result.per_test) - result.n_undefined} test points{left_out}; fit and "
            f"scores in {seconds:.1f} s)"
        )
    return 0
