#!/usr/bin/env bash
# CI step, run before the tests: build the local control-plane binaries, or reuse the cached ones
# (a warm run takes well under a second). Cache key for CI caches: the bin dir's name, which encodes
# every version (`e2e/cluster/build.sh --print-bin-dir`); cache that directory.
# Prints `K8S_BIN_DIR=<dir>` as its last line; exits non-zero (with the reason) if the build fails,
# so the integration tests never get silently skipped for lack of binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$SECONDS
bin_dir="$(bash e2e/cluster/build.sh)" || { echo "error: e2e/cluster/build.sh failed (messages above)" >&2; exit 1; }
bin_dir="$(tail -n 1 <<<"$bin_dir")"
bash e2e/cluster/build.sh --check
echo "control-plane binaries ready in $((SECONDS - t0))s" >&2
echo "K8S_BIN_DIR=$bin_dir"
