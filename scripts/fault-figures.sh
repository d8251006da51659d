#!/usr/bin/env bash
# Rerun the fault tests (issue 14 part 1) and record what they measure into docs/benchmarks/faults.json
# (git revision + dirty flag under "meta"): engine kill/stall, router restart, operator restart
# mid-reconcile, kube-apiserver frozen 30 s. docs/reliability.md quotes this file and
# docs/benchmarks/recovery.md (`corral bench recovery`, repeated measurements of the data-plane figures).
# The operator tests need the local Kubernetes binaries (make k8s-bins); without them they skip and their
# figures are not written.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${1:-docs/benchmarks/faults.json}"
# Recorded into a scratch file first: removing or rewriting the tracked results file while the tests run
# would make the checkout look dirty to the provenance the record carries.
TMP="$(mktemp -d)/faults.json"
CORRAL_FAULTS_RECORD="$TMP" "$PY" -m pytest -q -p no:cacheprovider \
  tests/integration/test_faults_dataplane.py tests/integration/test_faults_operator.py
mv "$TMP" "$OUT"
echo "wrote $OUT"
