# Sourced by scripts/run and scripts/test: create .venv if missing and
# install the project (editable) with the given extras.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

ensure_venv() {
    local extras="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "scripts: creating $VENV" >&2
        "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    local stamp="$VENV/.installed$extras"
    # Reinstall only when pyproject.toml or setup.py changed since the last
    # install, or a source of the compiled core (setup.py: broker/core is
    # compiled with mypyc; a stale build would refuse to import).
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ] \
        || [ -n "$(find "$ROOT/broker/core" -name '*.py' -newer "$stamp" -print -quit)" ]; then
        echo "scripts: installing the broker${extras:+ with $extras}" >&2
        "$VENV/bin/python" -m pip install -q -e "$ROOT$extras"
        touch "$stamp"
    fi
}
