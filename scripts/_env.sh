# Shared set-up for the scripts: an idempotent virtual environment in .venv with torch
# (the CPU wheel, installed first so that no CUDA build is pulled) and the package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INFLUX_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.influx-installed"
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet "torch==2.13.0"
    "$PY" -m pip install --quiet -e "$ROOT[dev]"
    touch "$STAMP"
fi
