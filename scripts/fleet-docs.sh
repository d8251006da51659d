#!/usr/bin/env bash
# Rerun every simulated-fleet result in docs/benchmarks (routing, issue 12) from this checkout, with the
# shipped defaults, and copy them into docs/benchmarks/. Each run writes to the git-ignored corral-bench/
# first, so the checkout stays clean and every results file records `dirty: false` when it was.
# About 100 minutes on 2 cores. Usage: scripts/fleet-docs.sh [PART ...]  (default: all parts below)
set -euo pipefail
cd "$(dirname "$0")/.."
CORRAL=${CORRAL:-.venv/bin/corral}
W=${WORKERS:-2}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(fleet heldout dualmap_paper ablation cpu_tier seeds)
for part in "${parts[@]}"; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case $part in
    fleet) "$CORRAL" bench fleet --workers "$W" --out corral-bench/fleet ;;
    heldout) "$CORRAL" bench fleet --trace bench/corral/bench/data/synthetic_trace.jsonl.gz --workers "$W" \
      --out corral-bench/heldout ;;
    dualmap_paper) "$CORRAL" bench fleet --workloads shared_prefix,bursty,conversation --seeds 0,1,2 \
      --policies corral,dualmap,dualmap_paper --no-plots --workers "$W" --out corral-bench/dualmap_paper ;;
    ablation) "$CORRAL" bench ablation --out corral-bench/ablation ;;
    cpu_tier) "$CORRAL" bench fleet --cpu-kv-gib 128 --workloads conversation,multi_turn \
      --policies corral,precise_prefix,dualmap,approx_prefix,least_loaded --workers "$W" --out corral-bench/cpu_tier ;;
    seeds) "$CORRAL" bench fleet --seeds 1,2 --policies corral,dualmap,precise_prefix --no-plots --workers "$W" \
      --out corral-bench/seeds ;;
    *) echo "unknown part '$part' (fleet heldout dualmap_paper ablation cpu_tier seeds)" >&2; exit 2 ;;
  esac
  if [ "$part" = fleet ] || [ "$part" = ablation ]; then
    cp corral-bench/"$part"/* docs/benchmarks/
  else
    mkdir -p docs/benchmarks/"$part" && cp corral-bench/"$part"/* docs/benchmarks/"$part"/
  fi
done
"${CORRAL%/corral}/python" -m corral.bench.routing_summary docs/benchmarks  # routing_summary.md from them
