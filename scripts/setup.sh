#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at .venv and install Corral with its extras.
# Idempotent: a second run only re-checks the install. Usage: scripts/setup.sh [EXTRAS]  (default dev,serve,operator)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev,serve,operator}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Corral needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
stamp=".venv/.corral-installed-$(cat pyproject.toml hatch_build.py 2>/dev/null | sha1sum | cut -c1-12)-$EXTRAS"
if [[ ! -f "$stamp" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  rm -f .venv/.corral-installed-*; touch "$stamp"
fi
echo "corral installed in .venv ($(.venv/bin/corral version 2>/dev/null || echo 'version unknown'))"
