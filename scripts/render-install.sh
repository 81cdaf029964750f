#!/usr/bin/env bash
# Regenerate what the Helm chart derives or copies, after changing the chart, the CRD types
# or operator/rbac.json:
#   charts/sluice/files/crds/batchinferencejob.yaml  <- crds/batchinferencejob.yaml (crdgen)
#   charts/sluice/files/rbac.json                    <- operator/rbac.json
#   manifests/install.yaml                           <- the chart, default values
#   deploy/prometheus/sluice-alerts.yaml             <- the chart's PrometheusRule
# `scripts/render-install.sh --check` only reports drift (what CI's tests also fail on).
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/packaging/env.sh
sluice_python_env
exec "$PY" tests/packaging/render.py "${@:---write}"
