"""influx.evaluation works on numbers from any library: no torch, nothing of influx.torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "influx" / "evaluation"


def test_no_module_of_the_package_imports_torch_or_the_torch_layer() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            offenders += [
                f"{path.name}: {name}"
                for name in names
                if name.split(".")[0] == "torch" or "torch" in name.split(".")[1:]
            ]
    assert offenders == []


def test_importing_the_package_loads_neither_torch_nor_zarr_nor_dask() -> None:
    code = (
        "import sys, influx.evaluation\n"
        "print(','.join(m for m in ('torch', 'influx.torch', 'zarr', 'distributed') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parents[1])},
    )
    assert result.stdout.strip() == ""
