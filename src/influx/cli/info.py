"""`influx info`: what a saved fit holds, without the network it was made for."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from .common import UsageError, echo, require_file

__all__ = ["add_info_parser", "run_info"]

INFO_DESCRIPTION = (
    "Show what a fit saved by influx rank --fit-out (or by model.save) holds: the influence "
    "model's class and settings, its blocks, the number of parameters, the fingerprint of the "
    "parameter values it was fitted for and the library version that saved it. Neither the "
    "network nor the fitted operators are loaded."
)


def add_info_parser(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Register the `info` subcommand on the subparsers `sub`."""
    parser = sub.add_parser(
        "info",
        help="what a saved fit holds",
        description=INFO_DESCRIPTION,
        parents=list(parents),
    )
    parser.add_argument("fit", type=Path, metavar="FIT", help="a fit saved by influx")
    parser.set_defaults(run=run_info)


def _value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def run_info(args: argparse.Namespace) -> int:
    """Run `influx info` with the parsed arguments `args`."""
    require_file(args.fit, "FIT")
    from ..torch.composition.persistence import read_fit_info

    try:
        info = read_fit_info(args.fit)
    except ValueError as error:
        raise UsageError("FIT", str(error)) from None
    echo(f"fit:          {args.fit}")
    echo(f"class:        {info['class']}")
    echo(f"parameters:   {info['n_parameters']}")
    blocks = info.get("blocks")
    if isinstance(blocks, dict):
        listed = ", ".join(f"{name} ({size})" for name, size in blocks.items())
        echo(f"blocks:       {len(blocks)}: {listed}")
    else:
        echo("blocks:       not recorded")
    echo(f"fingerprint:  {info['fingerprint']}")
    echo(f"version:      influx {info['version']}")
    echo(f"format:       {info['format']}")
    echo("settings:")
    for key, value in info["settings"].items():
        echo(f"  {key}: {_value(value)}")
    return 0
