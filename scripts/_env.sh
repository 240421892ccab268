# Shared set-up for the scripts: an idempotent virtual environment with torch (the CPU wheel,
# installed first so that no CUDA build is pulled) and the package with its dev tools.
#
# INFLUX_DEPS chooses the versions of everything else:
#   lock    (default) exactly the versions of requirements/dev.lock, in .venv
#   latest  the newest versions the index serves within pyproject.toml's ranges, in .venv-latest
#           (upgraded on every run)
#   oldest  the lower bounds of pyproject.toml's ranges (requirements/oldest.txt), in .venv-oldest
# torch is the CPU wheel 2.13.0 in every mode; INFLUX_TORCH=VERSION installs another release.
# INFLUX_VENV overrides the environment's folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="${INFLUX_DEPS:-lock}"
TORCH_VERSION="${INFLUX_TORCH:-2.13.0}"
case "$DEPS" in
    lock) DEFAULT_VENV="$ROOT/.venv" ;;
    latest) DEFAULT_VENV="$ROOT/.venv-latest" ;;
    oldest) DEFAULT_VENV="$ROOT/.venv-oldest" ;;
    *) echo "INFLUX_DEPS must be lock, latest or oldest, not '$DEPS'" >&2; exit 2 ;;
esac
VENV="${INFLUX_VENV:-$DEFAULT_VENV}"
PY="$VENV/bin/python"
STAMP="$VENV/.influx-installed-$DEPS"
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
stale() { [ ! -f "$STAMP" ] || [ "$1" -nt "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; }
case "$DEPS" in
    lock)
        if stale "$ROOT/requirements/dev.lock"; then
            pip_install "torch==$TORCH_VERSION"
            pip_install -r "$ROOT/requirements/dev.lock"
            pip_install --no-deps -e "$ROOT"
            "$PY" -m pip check
            touch "$STAMP"
        fi
        ;;
    latest)
        pip_install "torch==$TORCH_VERSION"
        pip_install --upgrade --upgrade-strategy eager -e "$ROOT[dev]" "torch==$TORCH_VERSION"
        touch "$STAMP"
        ;;
    oldest)
        if stale "$ROOT/requirements/oldest.txt"; then
            pip_install "torch==$TORCH_VERSION"
            pip_install -c "$ROOT/requirements/oldest.txt" -e "$ROOT[dev]"
            touch "$STAMP"
        fi
        ;;
esac
