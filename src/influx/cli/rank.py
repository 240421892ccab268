"""`influx rank`: rank the training points of the user's model by their influence on a
validation set, most harmful first."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence

from .common import UsageError, echo
from .fitting import (
    add_model_arguments,
    build,
    check_model_arguments,
    data_loader,
    diagnostics_lines,
    fit,
    lambda_text,
    warn_non_convergence,
)
from .loading import check_data_argument

__all__ = ["RANK_DESCRIPTION", "add_rank_parser", "run_rank", "write_ranking"]

logger = logging.getLogger(__name__)

RANK_DESCRIPTION = (
    "Fit an influence model to your trained network and rank every training point by its total "
    "influence on the loss of a validation set, sum_i I(z'_i, z_j). A positive influence helps "
    "the validation points, a negative one hurts them: the most harmful points (e.g. mislabeled "
    "ones) come first. Writes rank, index and influence of every training point to --out, and "
    "prints the top N and the solver diagnostics."
)
OUT_FORMATS = (".csv", ".json", ".parquet")


def add_rank_parser(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Register the `rank` subcommand on the subparsers `sub`."""
    parser = sub.add_parser(
        "rank",
        help="rank training points by their influence on a validation set",
        description=RANK_DESCRIPTION,
        parents=list(parents),
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("ranking")
    group.add_argument(
        "--validation",
        required=True,
        metavar="VAL",
        help="the validation data, in the same forms as --train",
    )
    group.add_argument(
        "--top", type=int, default=10, metavar="N", help="print the N most harmful (default: 10)"
    )
    group.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the full ranking (rank, index, influence; most harmful first) to a .csv, "
        ".json or .parquet file (parquet needs pyarrow, or pandas with fastparquet)",
    )
    group.add_argument(
        "--fit-out",
        type=Path,
        default=None,
        metavar="FILE",
        help="save the fit (see influx info) to FILE",
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="show progress bars",
    )
    parser.set_defaults(run=run_rank)


def _check_out(out: Path) -> None:
    if out.suffix not in OUT_FORMATS:
        raise UsageError(
            "--out", f"expected a file ending in {', '.join(OUT_FORMATS)}, got '{out}'"
        )
    if out.suffix == ".parquet" and _parquet_writer() is None:
        raise UsageError(
            "--out", "writing .parquet needs pyarrow (pip install pyarrow); use .csv or .json"
        )
    if not out.parent.exists():
        raise UsageError("--out", f"no such directory: '{out.parent}'")


def _parquet_writer() -> Optional[str]:
    """The installed library that writes parquet: pyarrow, or pandas with fastparquet."""
    if importlib.util.find_spec("pyarrow") is not None:
        return "pyarrow"
    if importlib.util.find_spec("pandas") and importlib.util.find_spec("fastparquet"):
        return "pandas"
    return None


def write_ranking(order: List[int], values: List[float], out: Path) -> Path:
    """Write the ranking: one row per training point, most harmful first, with its rank
    (1 = most harmful), index and total influence.

    Args:
        order: training indices, most harmful first.
        values: total influence per training index.
        out: a `.csv`, `.json` or `.parquet` path.
    """
    rows = [(rank, index, values[index]) for rank, index in enumerate(order, start=1)]
    if out.suffix == ".csv":
        with open(out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["rank", "index", "influence"])
            writer.writerows((r, i, repr(v)) for r, i, v in rows)
    elif out.suffix == ".json":
        records = [{"rank": r, "index": i, "influence": v} for r, i, v in rows]
        out.write_text(json.dumps(records, indent=0) + "\n")
    else:
        columns = {
            "rank": [r for r, _, _ in rows],
            "index": [i for _, i, _ in rows],
            "influence": [v for _, _, v in rows],
        }
        if _parquet_writer() == "pyarrow":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table(columns), out)
        else:
            import pandas as pd

            pd.DataFrame(columns).to_parquet(out, engine="fastparquet", index=False)
    return out


def _table(order: List[int], values: List[float], n: int) -> List[str]:
    lines = [f"{'rank':>6}  {'index':>8}  {'influence':>13}"]
    for rank, index in enumerate(order[:n], start=1):
        lines.append(f"{rank:>6}  {index:>8}  {values[index]:>13.6g}")
    return lines


def run_rank(args: argparse.Namespace) -> int:
    """Run `influx rank` with the parsed arguments `args`."""
    if args.out is not None:
        _check_out(args.out)
    if args.top < 0:
        raise UsageError("--top", f"must be >= 0, got {args.top}")
    check_model_arguments(args)
    check_data_argument(args.validation, "--validation")

    from ..torch.workflows.valuation import rank_training_points

    prepared = build(args)
    validation = prepared.load(args.validation, "--validation")
    fit(prepared, args.batch_size, args.seed)
    model = prepared.influence_model
    ranking = rank_training_points(
        model,
        data_loader(prepared.train, args.batch_size),
        data_loader(validation, args.batch_size),
        progress=args.progress,
    )
    order = [int(i) for i in ranking.indices.tolist()]
    values = [float(v) for v in ranking.values.tolist()]
    n_train, n_validation = len(order), len(validation)  # type: ignore[arg-type]
    if args.out is not None:
        write_ranking(order, values, args.out)
        logger.info("Ranking of %d training points written to %s", n_train, args.out)
    if args.fit_out is not None:
        model.save(args.fit_out)
    n_harmful = sum(v < 0 for v in values)
    echo(
        f"{type(model).__name__} (--method {args.method}, --loss {args.loss}, "
        f"lambda = {lambda_text(args.regularization)}), "
        f"{model.n_parameters} parameters; {n_train} training points ranked by their total "
        f"influence on {n_validation} validation points; {n_harmful} harmful (negative)."
    )
    if args.top > 0:
        echo(f"Most harmful {min(args.top, n_train)}:")
        for line in _table(order, values, args.top):
            echo(line)
    echo("Solver diagnostics:")
    for line in diagnostics_lines(model):
        echo(line)
    warn_non_convergence(model)
    return 0
