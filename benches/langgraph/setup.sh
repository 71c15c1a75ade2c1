#!/usr/bin/env bash
# Creates (or reuses) the venv the LangGraph bench runs in and installs
# requirements.txt into it, only when that file changed since the last install.
# Prints the venv's python on stdout (everything else goes to stderr), so a caller
# can do: py="$(benches/langgraph/setup.sh)" && "$py" benches/langgraph/agent.py ...
# NEXUS_BENCH_VENV overrides the venv's place; PYTHON the interpreter that makes it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${NEXUS_BENCH_VENV:-$HOME/.cache/nexus/bench-venv}"
base_python="${PYTHON:-python3}"
stamp="$venv/.nexus-langgraph-requirements"

# A venv whose interpreter went away (its base Python was removed) cannot be repaired in place.
if [ -f "$venv/pyvenv.cfg" ] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "setup.sh: $venv is broken, recreating it" >&2
    rm -rf -- "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    if ! "$base_python" -m venv "$venv" >&2; then
        echo "setup.sh: '$base_python -m venv' failed (on Debian's python: apt-get install python3-venv)" >&2
        exit 1
    fi
fi

want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1) $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])')"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
    printf '%s\n' "$want" >"$stamp"
fi
echo "$venv/bin/python"
