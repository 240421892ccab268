"""Shared by the subcommands: usage errors and writing results to standard output."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["UsageError", "echo", "require_file"]


class UsageError(Exception):
    """A command-line argument that cannot be used: the command exits with code 2.

    Args:
        argument: the option or positional argument at fault, e.g. `"--weights"`.
        message: what is wrong with it and what was expected, on one line.
    """

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument


def echo(line: str = "") -> None:
    """Write one line of a command's result to standard output.

    Results (tables, reports) go to standard output so that they can be piped; messages about
    the run go through `logging` to standard error.
    """
    sys.stdout.write(line + "\n")


def require_file(path: Path, argument: str) -> Path:
    """`path` if it exists, else a [UsageError][influx.cli.common.UsageError] naming `argument`."""
    if not path.exists():
        raise UsageError(argument, f"no such file or directory: '{path}'")
    return path
