# Sourced by scripts/run and scripts/test: make .venv and install the project
# into it, re-installing only when the packaging metadata changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
    echo "installing cortex-gateway${extras:+[$extras]} into .venv (log: .venv/install.log) ..." >&2
    if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
           .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"; } > .venv/install.log 2>&1; then
        tail -n 40 .venv/install.log >&2
        echo "install failed; the whole log is in .venv/install.log" >&2
        exit 1
    fi
    touch "$stamp"
fi
