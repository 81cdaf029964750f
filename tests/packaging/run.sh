#!/usr/bin/env bash
# Packaging checks: the Helm chart (helm lint, values schema, Kubernetes schemas, Pod Security
# "restricted", RBAC == operator/rbac.json, drift of manifests/install.yaml and the rendered
# alerts), the alerts (promtool check + unit tests), the Grafana dashboard, the Dockerfiles.
# Needs Python 3.11+ with pip/venv and apt (for promtool); no Docker, no cluster.
#   tests/packaging/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/packaging/env.sh
sluice_python_env
sluice_promtool
exec "$PY" -m pytest tests/packaging -q -p no:cacheprovider "$@"
