#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, validate the example CRs, then start a local
# Ray cluster with the example ModelPool (sim engines, two GPU classes) + the Corral router and send a
# short realistic workload through its OpenAI HTTP API, printing a live table. Extra args go to `corral demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/corral validate manifests/examples/
rc=0
.venv/bin/corral demo -f manifests/examples/ "$@" || rc=$?
echo "(the commands above use 'corral' from .venv: run 'source .venv/bin/activate' first, or prefix .venv/bin/)"
exit $rc
