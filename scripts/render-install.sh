#!/usr/bin/env bash
# Regenerate everything derived for the Helm chart:
#   charts/corral/{values.yaml,values.schema.json,README.md table,templates/crds/} from
#   operator/corral/operator/chart_values.py (+ manifests/crds), then manifests/install.yaml
#   (`helm template` with the default values; helm from e2e/cluster/build.sh's bin dir).
# tests/unit/test_chart.py fails when any of them is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
"$PY" -m corral.operator.chart_values charts/corral
"$PY" - <<'PY'
import sys
sys.path.insert(0, "tests/unit")
import chart_testkit
chart_testkit.INSTALL_YAML.write_text(chart_testkit.render_install_yaml())
print(f"wrote {chart_testkit.INSTALL_YAML}")
PY
