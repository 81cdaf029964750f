#!/usr/bin/env bash
# Starts a local S3-compatible server (moto in server mode, from PyPI) on 127.0.0.1 for the
# worker's S3 integration tests, and exports what they read. Source it (so the exports stay)
# or run it with `--print-env`. Needs Python 3 with pip; installs moto[server] if missing.
#
#   source scripts/s3-test-server.sh      # CI: exports SLUICE_TEST_S3_ENDPOINT and AWS_* vars
#   scripts/s3-test-server.sh --stop      # stop a server started from this checkout
set -euo pipefail

SLUICE_S3_PORT="${SLUICE_S3_PORT:-9199}"
SLUICE_S3_DIR="${SLUICE_S3_DIR:-${TMPDIR:-/tmp}/sluice-s3-test}"
mkdir -p "$SLUICE_S3_DIR"

if [[ "${1:-}" == "--stop" ]]; then
  if [[ -f "$SLUICE_S3_DIR/pid" ]]; then
    kill "$(cat "$SLUICE_S3_DIR/pid")" 2>/dev/null || true
    rm -f "$SLUICE_S3_DIR/pid"
  fi
  exit 0
fi

# `python3 -m moto.server` rather than the moto_server script: a fresh pyenv has no shim for it yet.
if ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1' >"$SLUICE_S3_DIR/pip.log" 2>&1 \
    || { cat "$SLUICE_S3_DIR/pip.log" >&2; exit 1; }
fi

endpoint="http://127.0.0.1:${SLUICE_S3_PORT}"
# Readiness probe without curl (not on every fresh machine): any HTTP answer counts.
s3_up() {
  python3 -c 'import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=1)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)' "$endpoint/"
}
if ! s3_up; then
  nohup python3 -m moto.server -H 127.0.0.1 -p "$SLUICE_S3_PORT" >"$SLUICE_S3_DIR/server.log" 2>&1 &
  echo $! >"$SLUICE_S3_DIR/pid"
  for _ in $(seq 1 100); do
    s3_up && break
    sleep 0.2
  done
  s3_up || { cat "$SLUICE_S3_DIR/server.log" >&2; exit 1; }
fi

export SLUICE_TEST_S3_ENDPOINT="$endpoint"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
echo "S3 test server (moto) at $SLUICE_TEST_S3_ENDPOINT"
if [[ "${1:-}" == "--print-env" ]]; then
  echo "export SLUICE_TEST_S3_ENDPOINT=$SLUICE_TEST_S3_ENDPOINT AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION"
fi
