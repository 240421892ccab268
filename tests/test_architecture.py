"""The layering rules of the package, checked on its source.

* no import cycle between influx's modules, counting imports inside functions;
* no module-level `__getattr__` outside a package `__init__`;
* no import of a private name from another module;
* `types` and `errors` import no numerical framework; the calculators and the chunk/zarr layer
  import nothing of `influx.torch`;
* no module longer than the size a reader keeps in their head;
* every module is in a layer of the map in `tests/layers.py` and imports only its own layer and
  the layers below; the chart of `docs/architecture.md` names every entry of the map in its
  layer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from layers import LAYERS, PLANNED, entry_of, layer_index

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "influx").rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> List[tuple]:
    """(imported module, imported names) for every import statement, anywhere in the file."""
    tree = ast.parse(path.read_text())
    result = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            result.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            result.append((_resolve(module, path, node), [a.name for a in node.names]))
    return result


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names in _imports(module, path):
            for candidate in [target] + [f"{target}.{n}" for n in names]:
                if candidate in modules and candidate != module:
                    graph[module].add(candidate)
    return graph


def _importers_of_package_init(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    # Importing "influx.torch.x" runs "influx.torch" first; a package __init__ importing its
    # own submodules is not a cycle with them, so edges into a package from its submodules are
    # dropped.
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}


def test_no_import_cycles() -> None:
    graph = _importers_of_package_init(_graph())
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_getattr_outside_package_init() -> None:
    offenders = []
    for module, path in _modules().items():
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
            offenders.append(module)
    assert offenders == []


def test_no_private_names_imported_across_modules() -> None:
    offenders = []
    for module, path in _modules().items():
        for target, names in _imports(module, path):
            if target.startswith("influx"):
                offenders += [
                    f"{module}: {target}.{n}"
                    for n in names
                    if n.startswith("_") and not n.startswith("__")
                ]
    assert offenders == []


@pytest.mark.parametrize("module", ["influx.types", "influx.errors"])
def test_protocol_modules_import_no_framework(module: str) -> None:
    path = _modules()[module]
    imported = {target.split(".")[0] for target, _ in _imports(module, path)}
    assert not imported & {"torch", "numpy", "dask", "zarr"}


def test_calculators_and_array_layer_do_not_import_torch_side() -> None:
    modules = _modules()
    offenders = []
    for module, path in modules.items():
        top = module.split(".")[1] if "." in module else ""
        if top in ("calculator", "array", "influence_calculator"):
            for target, _ in _imports(module, path):
                if target.startswith("influx.torch") or target.split(".")[0] == "torch":
                    offenders.append(f"{module} imports {target}")
    assert offenders == []


def test_modules_fit_in_a_head() -> None:
    long = {
        module: n
        for module, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_importing_the_torch_layer_loads_no_calculator_layer() -> None:
    import subprocess
    import sys

    code = (
        "import sys, influx.torch, influx.torch.models\n"
        "loaded = [m for m in ('influx.array', 'influx.calculator', 'dask', 'zarr', "
        "'distributed') if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


PYDVL_PATHS = {
    f"influx.torch.{name}"
    for name in (
        "base",
        "batch_operation",
        "functional",
        "influence_function_model",
        "operator",
        "preconditioner",
        "twice_differentiable",
        "util",
    )
}
"""The pyDVL import paths kept at the top of `influx.torch`: thin re-export modules."""


def test_library_modules_do_not_import_the_pydvl_paths() -> None:
    offenders = [
        f"{module} imports {target}"
        for module, path in _modules().items()
        if module not in PYDVL_PATHS and module != "influx.torch"
        for target, _ in _imports(module, path)
        if target in PYDVL_PATHS
    ]
    assert offenders == []


@pytest.mark.parametrize("module", sorted(PYDVL_PATHS))
def test_pydvl_paths_only_re_export(module: str) -> None:
    """A docstring, imports and `__all__`: nothing is defined at a pyDVL path."""
    tree = ast.parse(_modules()[module].read_text())
    docstring, *body = tree.body
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    assert "re-export" in docstring.value.value
    kinds = {type(node).__name__ for node in body}
    assert kinds <= {"ImportFrom", "Assign"}, kinds
    assigned = [t.id for n in body if isinstance(n, ast.Assign) for t in n.targets]
    assert assigned == ["__all__"]


def test_torch_package_top_holds_role_packages_and_pydvl_paths() -> None:
    top = SRC / "influx" / "torch"
    modules = {p.stem for p in top.glob("*.py")} - {"__init__"}
    assert {f"influx.torch.{m}" for m in modules} == PYDVL_PATHS
    assert len(modules) <= 12


def _layer_of_every_module() -> Dict[str, str]:
    """Module -> its entry in the layer map ("" for a module in none)."""
    entries = layer_index()
    modules = _modules()
    graph = _graph()
    result = {}
    for module, path in modules.items():
        entry = entry_of(module, entries)
        if not entry and path.name == "__init__.py" and not graph[module]:
            continue  # a role package's docstring
        result[module] = entry
    return result


def test_every_module_is_in_a_layer() -> None:
    assert [m for m, entry in _layer_of_every_module().items() if not entry] == []


def test_every_entry_of_the_layer_map_names_modules() -> None:
    covered = set(_layer_of_every_module().values())
    stale = [e for e in layer_index() if e not in covered and e not in PLANNED]
    assert stale == []


def test_modules_import_only_their_layer_and_below() -> None:
    entries = layer_index()
    located = _layer_of_every_module()
    upward = []
    for module, targets in _importers_of_package_init(_graph()).items():
        if module not in located:
            continue
        for target in targets:
            if target in located and entries[located[target]] > entries[located[module]]:
                upward.append(
                    f"{module} ({LAYERS[entries[located[module]]][0]}) imports {target} "
                    f"({LAYERS[entries[located[target]]][0]})"
                )
    assert upward == []


def _chart() -> List[Tuple[str, str]]:
    """(layer, name) for every name in the table of the Layers section of the architecture
    page; `a.{b, c}` stands for `a.b` and `a.c`."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    named = []
    layer = ""
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        layer = cells[0] or layer
        for token in re.findall(r"`([^`]+)`", cells[1]):
            match = re.fullmatch(r"([\w.]+)\.\{([^}]*)\}", token)
            if match:
                named += [(layer, f"{match[1]}.{n.strip()}") for n in match[2].split(",")]
            else:
                named.append((layer, token))
    return named


def test_architecture_chart_is_the_layer_map() -> None:
    chart = _chart()
    assert sorted(chart) == sorted(set(chart)), "a name appears twice in the chart"
    expected = {(name, entry) for name, entries in LAYERS for entry in entries}
    assert set(chart) - expected == set(), "named in the chart, not in this layer of the map"
    assert expected - set(chart) == set(), "in the layer map, missing from the chart"
