"""`influx matrix`: the test x train influence matrix of the user's model to zarr, resumably;
and `influx status`: how far such a write got and how to continue it."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .common import UsageError, echo, require_file
from .fitting import (
    Fitted,
    add_model_arguments,
    build,
    check_model_arguments,
    data_loader,
    fit,
    warn_non_convergence,
)
from .loading import check_data_argument

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["add_matrix_parser", "add_status_parser", "run_matrix", "run_status"]

logger = logging.getLogger(__name__)

MATRIX_DESCRIPTION = (
    "Compute the influence I(z'_i, z_j) of every training point z_j on every test point z'_i "
    "and write the (test x train) matrix to a zarr array, chunk by chunk (one chunk per pair "
    "of batches). The write is resumable: running the same command again computes only the "
    "chunks that are missing. Runs in this process, or on a Dask cluster with --dask or "
    "--workers."
)
STATUS_DESCRIPTION = (
    "Report on a zarr array written by influx matrix (or by the library's calculators): "
    "shape, influence mode, chunks done out of the total, and the command that resumes it."
)
CLI_KEY = "cli"
COMMAND_KEY = "command"
DIRECTORY_KEY = "directory"
# Options that do not change what is computed: left out of the recorded command.
_RUN_ONLY_FLAGS = {"--progress", "--no-progress", "--debug", "--overwrite"}
_RUN_ONLY_OPTIONS = {"--max-chunks"}


def add_matrix_parser(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Register the `matrix` subcommand on the subparsers `sub`."""
    parser = sub.add_parser(
        "matrix",
        help="write the test x train influence matrix to zarr (resumable)",
        description=MATRIX_DESCRIPTION,
        parents=list(parents),
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("matrix")
    group.add_argument(
        "--test",
        "--validation",
        dest="test",
        required=True,
        metavar="TEST",
        help="the test points (rows), in the same forms as --train",
    )
    group.add_argument(
        "--out", required=True, type=Path, metavar="M.zarr", help="the zarr array to write"
    )
    backend = group.add_mutually_exclusive_group()
    backend.add_argument(
        "--dask",
        metavar="SCHEDULER_ADDRESS",
        default=None,
        help="compute on the Dask cluster at this address (its workers must run one thread "
        "each and be able to import the model's module)",
    )
    backend.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="compute on a local Dask cluster of N single-threaded worker processes",
    )
    group.add_argument(
        "--max-chunks",
        type=int,
        default=None,
        metavar="K",
        help="compute at most K chunks in this run, then stop (run the same command again to "
        "continue); not with --dask or --workers",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace an existing array at --out"
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar (default: on)",
    )
    parser.set_defaults(run=run_matrix)


def add_status_parser(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Register the `status` subcommand on the subparsers `sub`."""
    parser = sub.add_parser(
        "status",
        help="how far a zarr write got, and the command that resumes it",
        description=STATUS_DESCRIPTION,
        parents=list(parents),
    )
    parser.add_argument("store", type=Path, metavar="STORE.zarr", help="the zarr array")
    parser.set_defaults(run=run_status)


def recorded_command(argv: Sequence[str]) -> str:
    """The `influx matrix` command line of `argv` without the options that only affect a run
    (progress, debug, overwrite, the chunk budget), shell-quoted."""
    kept: List[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if item in _RUN_ONLY_FLAGS:
            continue
        if name in _RUN_ONLY_OPTIONS:
            skip = "=" not in item
            continue
        kept.append(item)
    return shlex.join(["influx", *kept])


def _stored_attributes(path: Path) -> Optional[Dict[str, Any]]:
    """The influx attributes of the zarr array at `path`; None if there is no array."""
    if not path.exists():
        return None
    import zarr

    from ..array import ATTRIBUTE_KEY

    try:
        array = zarr.open_array(store=str(path), mode="r")
    except Exception as error:  # noqa: BLE001 - whatever zarr raises, the path is unusable
        raise UsageError(
            "--out", f"'{path}' exists and is not a zarr array ({type(error).__name__})"
        ) from None
    recorded = array.attrs.get(ATTRIBUTE_KEY)
    return dict(recorded) if isinstance(recorded, dict) else {}


class _ChunkBudgetReached(Exception):
    """Raised by the converter once the chunk budget of a run is spent."""


def _counting_converter(budget: Optional[int], bar: Any) -> Any:
    """A torch-to-numpy converter that advances `bar` per chunk and stops after `budget`."""
    from ..torch.data.array_converters import TorchNumpyConverter

    class CountingConverter(TorchNumpyConverter):
        """Converts chunks to numpy, at most `budget` of them, counting them on `bar`."""

        def __init__(self) -> None:
            super().__init__()
            self.converted = 0

        def to_numpy(self, x: Any) -> "np.ndarray":
            if budget is not None and self.converted >= budget:
                raise _ChunkBudgetReached()
            self.converted += 1
            bar.update(1)
            return super().to_numpy(x)

    return CountingConverter()


def run_matrix(args: argparse.Namespace) -> int:
    """Run `influx matrix` with the parsed arguments `args`."""
    if args.out.suffix != ".zarr":
        raise UsageError("--out", f"expected a path ending in .zarr, got '{args.out}'")
    distributed = args.dask is not None or args.workers is not None
    if args.max_chunks is not None and (args.max_chunks < 1 or distributed):
        raise UsageError(
            "--max-chunks",
            "must be a positive integer, without --dask or --workers; got "
            f"{args.max_chunks}" + (" with a Dask cluster" if distributed else ""),
        )
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers", f"must be a positive integer, got {args.workers}")
    check_model_arguments(args)
    check_data_argument(args.test, "--test")
    args.progress = bool(args.progress)
    stored = None if args.overwrite else _stored_attributes(args.out)

    prepared = build(args)
    settings = prepared.settings
    if stored is not None:
        if CLI_KEY not in stored:
            raise UsageError(
                "--out",
                f"'{args.out}' exists and was not written by influx matrix; pass --overwrite to "
                "replace it",
            )
        if stored[CLI_KEY] != settings:
            raise UsageError(
                "--out",
                f"'{args.out}' holds another computation ({_difference(stored[CLI_KEY], settings)}); "
                "pass --overwrite to replace it",
            )
        if stored.get("complete"):
            echo(f"{args.out} is complete: nothing to compute (influx status {args.out}).")
            return 0
    metadata: Dict[str, Any] = {CLI_KEY: settings}
    if stored is None:
        metadata[COMMAND_KEY] = recorded_command(args.argv)
        metadata[DIRECTORY_KEY] = os.getcwd()
    else:
        metadata.update({k: stored[k] for k in (COMMAND_KEY, DIRECTORY_KEY) if k in stored})
    test = prepared.load(args.test, "--test")
    fit(prepared, args.batch_size, args.seed)
    if distributed:
        _write_on_dask(args, prepared, test, metadata)
        stopped = False
    else:
        stopped = _write_sequentially(args, prepared, test, metadata)
    warn_non_convergence(prepared.influence_model)
    return _report(args.out, stopped)


def _difference(stored: Dict[str, Any], given: Dict[str, Any]) -> str:
    keys = sorted(k for k in set(stored) | set(given) if stored.get(k) != given.get(k))
    return ", ".join(f"{k}: stored {stored.get(k)!r}, given {given.get(k)!r}" for k in keys)


def _write_sequentially(
    args: argparse.Namespace, prepared: Fitted, test: Any, metadata: Dict[str, Any]
) -> bool:
    from ..calculator import SequentialInfluenceCalculator

    lazy = SequentialInfluenceCalculator(prepared.influence_model).influences(
        data_loader(test, args.batch_size), data_loader(prepared.train, args.batch_size)
    )
    lazy.metadata.update(metadata)
    from tqdm.auto import tqdm

    n_chunks = _n_batches(test, args.batch_size) * _n_batches(prepared.train, args.batch_size)
    done = 0 if args.overwrite or not args.out.exists() else _done_chunks(args.out)
    with tqdm(total=n_chunks, initial=done, desc="chunks", disable=not args.progress) as bar:
        converter = _counting_converter(args.max_chunks, bar)
        try:
            lazy.to_zarr(
                str(args.out), converter, overwrite=args.overwrite, resume=not args.overwrite
            )
        except _ChunkBudgetReached:
            logger.info("Stopped after %d chunks (--max-chunks).", converter.converted)
            return True
    return False


def _n_batches(dataset: Any, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


def _done_chunks(out: Path) -> int:
    from ..array import zarr_write_status

    return zarr_write_status(str(out)).n_completed_chunks


def _write_on_dask(
    args: argparse.Namespace, prepared: Fitted, test: Any, metadata: Dict[str, Any]
) -> None:
    if not args.debug:  # dask's own messages only when they matter (also in the workers)
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    import numpy as np
    from distributed import Client, LocalCluster

    if not args.debug:
        logging.getLogger("distributed").setLevel(logging.WARNING)

    from ..array import dask_array_to_zarr
    from ..calculator import DaskInfluenceCalculator, ThreadSafetyViolationError
    from ..torch.data.array_converters import TorchNumpyConverter, torch_dataset_to_dask_array

    dtype = np.dtype(str(prepared.dtype).split(".")[-1]).type
    cluster = None
    if args.dask is not None:
        try:
            client = Client(args.dask, timeout="20s")
        except OSError as error:
            raise UsageError("--dask", f"cannot connect to {args.dask!r} ({error})") from None
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)
    try:
        try:
            calculator = DaskInfluenceCalculator(
                prepared.influence_model, TorchNumpyConverter(), client
            )
        except ThreadSafetyViolationError as error:
            raise UsageError("--dask", str(error)) from None
        x, y = torch_dataset_to_dask_array(prepared.train, args.batch_size, resulting_dtype=dtype)
        x_test, y_test = torch_dataset_to_dask_array(test, args.batch_size, resulting_dtype=dtype)
        values = calculator.influences(x_test, y_test, x, y)
        metadata = {**getattr(values, "zarr_metadata", {}), **metadata}
        dask_array_to_zarr(
            values,
            str(args.out),
            overwrite=args.overwrite,
            resume=not args.overwrite,
            metadata=metadata,
            progress=args.progress,
        )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _report(out: Path, stopped: bool) -> int:
    from ..array import zarr_write_status

    status = zarr_write_status(str(out))
    done, total = status.n_completed_chunks, status.n_chunks
    if stopped:
        echo(
            f"Stopped after the chunk budget: {done} of {total} chunks of {out} done; run the "
            "same command again to continue."
        )
    else:
        echo(f"{out}: {done} of {total} chunks done, complete.")
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Run `influx status` with the parsed arguments `args`."""
    require_file(args.store, "STORE")
    import zarr

    from ..array import zarr_write_status

    try:
        status = zarr_write_status(str(args.store))
        array = zarr.open_array(store=str(args.store), mode="r")
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise UsageError(
            "STORE", f"'{args.store}' is not a zarr array written by influx ({error})"
        ) from None
    meta = status.metadata
    mode = meta.get("mode", "-")
    total = "unknown" if status.n_chunks is None else str(status.n_chunks)
    echo(f"store:       {args.store}")
    echo(f"quantity:    {meta.get('quantity', '-')}")
    echo(f"mode:        {mode}")
    echo(f"shape:       {tuple(array.shape)} {array.dtype}")
    echo(f"chunks:      {status.n_completed_chunks} of {total} done")
    echo(f"complete:    {'yes' if status.complete else 'no'}")
    echo(f"written by:  influx {meta.get('library_version', '?')}")
    settings = meta.get(CLI_KEY)
    if isinstance(settings, dict):
        echo(
            f"method:      {settings.get('method')} (lambda = {settings.get('regularization')}), "
            f"model {settings.get('model')}"
        )
    command = meta.get(COMMAND_KEY)
    if command:
        directory = meta.get(DIRECTORY_KEY)
        echo(f"created by:  {command}")
        if directory:
            echo(f"directory:   {directory}")
        if not status.complete:
            prefix = f"cd {shlex.quote(directory)} && " if directory else ""
            echo(f"resume with: {prefix}{command}")
    elif not status.complete:
        echo("resume with: the same computation with resume=True (not written by influx matrix)")
    if status.missing_chunks and not status.complete:
        shown = ", ".join(str(c) for c in status.missing_chunks[:6])
        more = ", ..." if len(status.missing_chunks) > 6 else ""
        echo(f"missing:     {shown}{more}")
    return 0
