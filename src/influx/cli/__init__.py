"""The `influx` command line.

Subcommands: `demo` (mislabeled digits found by influence), `rank` (rank the training points
of your own model), `matrix` (the test x train influence matrix to zarr, resumable), `info`
(what a saved fit holds), `status` (how far a zarr write got) and `evaluate` (the LDS of
influence methods against retraining on subsets).

Exit codes: 0 on success, 2 for a usage error (a bad argument, a missing file, a model or
data that cannot be loaded), 1 for an error during the computation. Errors are reported on
one line; `--debug` adds the traceback. Results go to standard output, messages about the run
to standard error. torch is imported only by the subcommands that compute.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence

from .. import __version__
from ..evaluation import detection_auc
from .common import UsageError
from .demo import (
    DemoReport,
    add_demo_parser,
    plot_report,
    run_demo,
    write_influences_zarr,
)
from .evaluate import add_evaluate_parser
from .info import add_info_parser
from .matrix import add_matrix_parser, add_status_parser
from .rank import add_rank_parser

__all__ = [
    "DemoReport",
    "UsageError",
    "detection_auc",
    "build_parser",
    "main",
    "plot_report",
    "run_demo",
    "write_influences_zarr",
]

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Influence functions for PyTorch models: how much each training point shaped the loss on "
    "each test point. Run 'influx COMMAND --help' for the options of a command."
)
EPILOG = (
    "exit codes: 0 success, 2 usage error (bad argument, missing file, model or data that "
    "cannot be loaded), 1 error during the computation."
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `influx` command with all its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show the traceback of an error and debug messages"
    )
    parser = argparse.ArgumentParser(prog="influx", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"influx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [common]
    add_demo_parser(sub, parents)
    add_rank_parser(sub, parents)
    add_matrix_parser(sub, parents)
    add_info_parser(sub, parents)
    add_status_parser(sub, parents)
    add_evaluate_parser(sub, parents)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the `influx` command with the arguments `argv` (default: `sys.argv[1:]`).

    Returns:
        The exit code: 0 on success, 2 for a usage error, 1 for a computation error.
    """
    arguments: List[str] = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 2
    args.argv = arguments
    # influx's own messages at INFO (DEBUG with --debug), other libraries' (dask) at WARNING
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("influx").setLevel(logging.DEBUG if args.debug else logging.INFO)
    prog = f"influx {args.command}"
    try:
        return int(args.run(args))
    except UsageError as error:
        if args.debug:
            logger.exception("Usage error")
        sys.stderr.write(f"{prog}: error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and exit code 1
        if args.debug:
            logger.exception("Computation error")
        message = " ".join(str(error).split()) or "(no message)"
        sys.stderr.write(
            f"{prog}: error: {type(error).__name__}: {message}"
            + ("" if args.debug else " (--debug shows the traceback)")
            + "\n"
        )
        return 1
