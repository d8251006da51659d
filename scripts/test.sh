#!/usr/bin/env bash
# The whole test suite as CI runs it: set up .venv, build (or reuse cached) control-plane binaries,
# lint, type-check, check import layering and generated CRDs, then pytest (unit + integration).
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/setup.sh
bash .ci/build-k8s.sh
echo "== control-plane binaries ready ($(( $(date +%s) - t0 ))s so far)"
V=.venv/bin
# one command per line: under `set -e` a failure on the left of `&&` would not stop the script
echo "== ruff"; $V/ruff check .
$V/ruff format --check .
echo "== mypy"; $V/mypy api router serve operator bench
echo "== import layering"; $V/lint-imports
echo "== generated CRDs are up to date"; $V/corral crds --check
echo "== pytest"
set +e
$V/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then echo "error: pytest collected no tests" >&2; exit 1; fi
echo "== total $(( $(date +%s) - t0 ))s"
exit $rc
