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
rm -f "$OUT"
CORRAL_FAULTS_RECORD="$(realpath -m "$OUT")" "$PY" -m pytest -q -p no:cacheprovider \
  tests/integration/test_faults_dataplane.py tests/integration/test_faults_operator.py
echo "wrote $OUT"
