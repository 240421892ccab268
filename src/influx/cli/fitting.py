"""The arguments shared by `influx rank` and `influx matrix`: model, data, method; and the fit."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from .common import UsageError, require_file
from .loading import (
    AUTO_LOSS,
    LOSSES,
    check_data_argument,
    check_object_path,
    file_digest,
    load_data,
    load_loss,
    load_model,
)
from .methods import METHODS, build_influence_model, methods_help, parse_options

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import DataLoader, Dataset

    import torch

    from ..torch.composition.composable import TorchComposableInfluence

__all__ = [
    "Fitted",
    "add_model_arguments",
    "build",
    "check_evaluable",
    "check_model_arguments",
    "choose_loss",
    "data_loader",
    "diagnostics_lines",
    "fit",
    "warn_non_convergence",
]

logger = logging.getLogger(__name__)

DEFAULT_REGULARIZATION = 0.01


def regularization_argument(text: str) -> Any:
    """`--regularization`: `auto` (trace / P of each block's curvature, 0.1 of it for Kronecker-factored ones) or a number."""
    return "auto" if text.strip().lower() == "auto" else float(text)


def check_regularization_argument(value: Any) -> None:
    """Raise a UsageError naming `--regularization` for a negative number."""
    if value != "auto" and value < 0:
        raise UsageError("--regularization", f"must be >= 0 or auto, got {value}")


def lambda_text(value: Any) -> str:
    """`value` as printed in summaries."""
    return value if isinstance(value, str) else f"{value:g}"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model, training data and method options to `parser`."""
    group = parser.add_argument_group("model and training data")
    group.add_argument(
        "--model",
        required=True,
        metavar="PKG.MODULE:FACTORY",
        help="a function called without arguments that returns the network (torch.nn.Module); "
        "the current directory is importable",
    )
    group.add_argument(
        "--weights",
        required=True,
        type=Path,
        metavar="W.pt",
        help="the trained state dict, read with torch.load(weights_only=True)",
    )
    group.add_argument(
        "--train",
        required=True,
        metavar="TRAIN",
        help="the training data: a .pt file holding (x, y) or a dict with x and y (or inputs "
        "and labels), a .npz file with arrays x and y, or PKG.MODULE:FACTORY returning a torch "
        "Dataset of (x, y) items or an (x, y) pair",
    )
    group.add_argument(
        "--loss",
        default=AUTO_LOSS,
        metavar="LOSS",
        help=f"{' or '.join(LOSSES)} (mean reduction), or PKG.MODULE:FUNCTION with signature "
        "loss(prediction, target); the default, auto, takes mse when the targets are floats of "
        "the model's output shape and cross_entropy otherwise, and says which",
    )
    group = parser.add_argument_group("influence method")
    group.add_argument(
        "--method",
        default="direct",
        choices=list(METHODS),
        help=f"how the inverse curvature is applied (default: direct). {methods_help()}",
    )
    group.add_argument(
        "--regularization",
        type=regularization_argument,
        default=DEFAULT_REGULARIZATION,
        metavar="LAMBDA",
        help="lambda added to the curvature, H + lambda I, or 'auto' for trace(C) / P of "
        "each block's curvature C (the chosen values are printed) (default: %(default)s)",
    )
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further argument of the method's influence model class, e.g. rank=20 or "
        "maxiter=200 (repeatable; VALUE is a Python literal or a string)",
    )
    group = parser.add_argument_group("computation")
    group.add_argument(
        "--batch-size",
        type=int,
        default=256,
        metavar="B",
        help="points per batch and per chunk (default: %(default)s)",
    )
    group.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where to compute (default: cpu)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch's seed before the fit, for methods with random steps (default: 0)",
    )


def check_model_arguments(args: argparse.Namespace) -> None:
    """Check what can be checked without torch: files exist, factory paths are well formed."""
    check_object_path(args.model, "--model")
    require_file(args.weights, "--weights")
    check_data_argument(args.train, "--train")
    if args.loss not in LOSSES and args.loss != AUTO_LOSS:
        check_object_path(args.loss, "--loss", "FUNCTION")
    check_regularization_argument(args.regularization)
    if args.batch_size < 1:
        raise UsageError("--batch-size", f"must be a positive integer, got {args.batch_size}")
    parse_options(args.option)


def data_loader(dataset: "Dataset", batch_size: int) -> "DataLoader":
    """A non-shuffling loader: indices follow the dataset's order."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@dataclass
class Fitted:
    """A fitted influence model with what it was built from.

    Attributes:
        influence_model: the fitted model.
        train: the training data.
        dtype: the network's parameter dtype.
        settings: what identifies the computation (model factory, weights digest, method,
            regularization, loss, options, seed), recorded with results.
        loss: the loss function (`--loss`, resolved when it was `auto`).
    """

    influence_model: "TorchComposableInfluence"
    train: "Dataset"
    dtype: "torch.dtype"
    settings: Dict[str, Any]
    loss: Callable[..., Any]

    def load(self, value: str, argument: str) -> "Dataset":
        """Load further data (validation or test) for this model, checked by evaluating the
        network and the loss on its first points."""
        data = load_data(value, argument, self.dtype)
        network, loss = self.influence_model.model, self.loss
        check_evaluable(network, None, data, argument)
        try:  # a loss that fails on the training data too is reported by the fit
            check_evaluable(network, loss, self.train, "--train")
        except UsageError:
            return data
        check_evaluable(network, loss, data, argument)
        return data


def build(args: argparse.Namespace) -> Fitted:
    """Load the model, loss and training data and build the (unfitted) influence model."""
    network = load_model(args.model, args.weights, args.device)
    parameters = [p for p in network.parameters() if p.requires_grad]
    if not parameters:
        raise UsageError("--model", f"{args.model}() has no trainable parameters")
    dtype = parameters[0].dtype
    train = load_data(args.train, "--train", dtype)
    check_evaluable(network, None, train, "--train")
    if args.loss == AUTO_LOSS:
        args.loss = choose_loss(network, train)
    loss: Callable[..., Any] = load_loss(args.loss)
    options = parse_options(args.option)
    method = METHODS[args.method]
    influence_model = build_influence_model(
        method, network, loss, args.regularization, options, progress=args.progress
    )
    settings = {
        "model": args.model,
        "weights_sha256": file_digest(args.weights),
        "method": args.method,
        "regularization": args.regularization,
        "loss": args.loss,
        "options": {k: repr(v) for k, v in sorted(options.items())},
        "seed": args.seed,
    }
    return Fitted(influence_model, train, dtype, settings, loss)


def _first_points(dataset: "Dataset", n: int = 2) -> Any:
    from torch.utils.data import default_collate

    size = len(dataset)  # type: ignore[arg-type]
    return default_collate([dataset[i] for i in range(min(n, size))])


def choose_loss(network: "torch.nn.Module", train: "Dataset") -> str:
    """`--loss auto`: `mse` when the training targets are floating-point tensors of the
    model's output shape (a regression), `cross_entropy` otherwise; logged."""
    import torch

    x, y = _first_points(train)
    with torch.no_grad():
        output = network(x)
    regression = (
        isinstance(y, torch.Tensor)
        and y.is_floating_point()
        and isinstance(output, torch.Tensor)
        and tuple(y.shape) == tuple(output.shape)
    )
    chosen = "mse" if regression else "cross_entropy"
    reason = (
        f"the targets are floats of the model's output shape {tuple(output.shape[1:])}"
        if regression
        else "the targets are not floats of the model's output shape"
    )
    logger.info("--loss auto: %s, so the loss is %s.", reason, chosen)
    return chosen


def check_evaluable(
    network: "torch.nn.Module",
    loss: Optional[Callable[..., Any]],
    data: "Dataset",
    argument: str,
) -> None:
    """Evaluate the network (and the loss, when given) on the first two points of `data`,
    before anything is fitted: data of the wrong width or targets the loss cannot take are a
    [UsageError][influx.cli.common.UsageError] naming `argument`."""
    import torch

    x, y = _first_points(data)
    try:
        with torch.no_grad():
            output = network(x)
            if loss is not None:
                loss(output, y)
    except Exception as error:  # whatever the user's model or loss raises on these inputs
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        what = "the model" if loss is None else "the model and the loss"
        raise UsageError(
            argument,
            f"{what} cannot be evaluated on its first points (inputs {shape}): "
            f"{type(error).__name__}: {error}",
        ) from error


def fit(prepared: Fitted, batch_size: int, seed: int) -> Fitted:
    """Fit the influence model of `prepared` to its training data (seeded) and return it."""
    import torch

    torch.manual_seed(seed)
    model = prepared.influence_model
    logger.info(
        "Fitting %s (%d parameters) on %d training points.",
        type(model).__name__,
        model.n_parameters,
        len(prepared.train),  # type: ignore[arg-type]
    )
    model.fit(data_loader(prepared.train, batch_size))
    return prepared


def diagnostics_lines(model: "TorchComposableInfluence") -> List[str]:
    """One line per block: the solver, whether it converged, iterations and residual."""
    lines = []
    for name, report in model.solver_diagnostics.items():
        if report is None:
            lines.append(f"  {name}: no solver report")
            continue
        parts = [report.method, "converged" if report.converged else "NOT converged"]
        if report.iterations is not None:
            parts.append(f"{report.iterations} iterations")
        if report.residual is not None:
            parts.append(f"relative residual {report.residual:.3g}")
        if report.regularization is not None:
            parts.append(f"lambda = {report.regularization:.3g}")
        if report.condition_number is not None:
            parts.append(f"condition number {report.condition_number:.3g}")
        lines.append(f"  {name}: {', '.join(parts)}")
    return lines


def warn_non_convergence(model: "TorchComposableInfluence") -> bool:
    """Log a warning per block whose solver did not converge; True if any did not."""
    failed = False
    for name, report in model.solver_diagnostics.items():
        if report is not None and not report.converged:
            failed = True
            residual: Optional[float] = report.residual
            logger.warning(
                "Warning: the %s solver of block %r did not converge (relative residual %s "
                "after %s iterations); raise its iteration budget with --option.",
                report.method,
                name,
                "unknown" if residual is None else f"{residual:.3g}",
                "?" if report.iterations is None else report.iterations,
            )
    return failed
