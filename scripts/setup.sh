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
t0=$SECONDS
step() { echo "== setup: $* ($(( SECONDS - t0 ))s)"; }
if [[ ! -x .venv/bin/python ]]; then
  step "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=".venv/.corral-installed-$(cat pyproject.toml hatch_build.py 2>/dev/null | sha1sum | cut -c1-12)-$EXTRAS"
if [[ ! -f "$stamp" ]]; then
  step "upgrading pip"
  .venv/bin/python -m pip install --upgrade --progress-bar off pip
  # One line per package as pip resolves, downloads and installs (first run: ~1-2 min, Ray is the big one).
  step "installing corral[$EXTRAS] (editable) and its dependencies"
  .venv/bin/python -m pip install --progress-bar off -e ".[$EXTRAS]"
  rm -f .venv/.corral-installed-*; touch "$stamp"
  step "done"
fi
echo "corral installed in .venv ($(.venv/bin/corral version 2>/dev/null || echo 'version unknown'))"
