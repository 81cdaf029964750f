#!/usr/bin/env bash
# Starts local S3-compatible servers (moto in server mode, from PyPI) on 127.0.0.1 for the S3
# integration tests, and exports what they read: one over plain HTTP, and one over HTTPS with a
# certificate from a CA made here (scripts/make-test-ca.py), which no system trusts: the tests
# of `spec.storage.caBundle` pass that CA. Source it (so the exports stay) or run it with
# `--print-env`. Needs Python 3 with pip; installs moto[server] if missing.
#
#   source scripts/s3-test-server.sh      # CI: exports SLUICE_TEST_S3_ENDPOINT, AWS_* vars and
#                                         # SLUICE_TEST_S3_TLS_{ENDPOINT,CA,BUCKET}
#   scripts/s3-test-server.sh --stop      # stop the servers started from this checkout
set -euo pipefail

SLUICE_S3_PORT="${SLUICE_S3_PORT:-9199}"
SLUICE_S3_TLS_PORT="${SLUICE_S3_TLS_PORT:-9443}"
SLUICE_S3_DIR="${SLUICE_S3_DIR:-${TMPDIR:-/tmp}/sluice-s3-test}"
mkdir -p "$SLUICE_S3_DIR"

if [[ "${1:-}" == "--stop" ]]; then
  for pidfile in "$SLUICE_S3_DIR/pid" "$SLUICE_S3_DIR/tls.pid"; do
    if [[ -f "$pidfile" ]]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  exit 0
fi

# `python3 -m moto.server` rather than the moto_server script: a fresh pyenv has no shim for it yet.
if ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1' >"$SLUICE_S3_DIR/pip.log" 2>&1 \
    || { cat "$SLUICE_S3_DIR/pip.log" >&2; exit 1; }
fi

endpoint="http://127.0.0.1:${SLUICE_S3_PORT}"
# Readiness probe without curl (not on every fresh machine): any HTTP answer from URL counts;
# CAFILE, when given, is the CA to trust for https.
http_up() { # URL [CAFILE]
  python3 -c 'import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2]) if len(sys.argv) > 2 else None
try:
    urllib.request.urlopen(sys.argv[1], timeout=1, context=ctx)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)' "$@"
}
# Wait up to 20 s for `http_up URL [CAFILE]`; on failure print LOG and fail.
wait_up() { # LOG URL [CAFILE]
  local log=$1
  shift
  for _ in $(seq 1 100); do
    http_up "$@" && return 0
    sleep 0.2
  done
  http_up "$@" || { cat "$log" >&2; exit 1; }
}
s3_up() { http_up "$endpoint/"; }
if ! s3_up; then
  nohup python3 -m moto.server -H 127.0.0.1 -p "$SLUICE_S3_PORT" >"$SLUICE_S3_DIR/server.log" 2>&1 &
  echo $! >"$SLUICE_S3_DIR/pid"
  wait_up "$SLUICE_S3_DIR/server.log" "$endpoint/"
fi

# The same over HTTPS, with a certificate for 127.0.0.1/localhost from a CA of our own. A
# separate moto process, so it has its own buckets: one is made here for the tests.
tls_dir="$SLUICE_S3_DIR/tls"
python3 "$(dirname "${BASH_SOURCE[0]}")/make-test-ca.py" "$tls_dir" >/dev/null
tls_endpoint="https://127.0.0.1:${SLUICE_S3_TLS_PORT}"
tls_bucket="sluice-tls-test"
s3_tls_up() { http_up "$tls_endpoint/" "$tls_dir/ca.crt"; }
if ! s3_tls_up; then
  # A server from an earlier run may hold the port with a certificate of an older CA.
  if [[ -f "$SLUICE_S3_DIR/tls.pid" ]]; then
    kill "$(cat "$SLUICE_S3_DIR/tls.pid")" 2>/dev/null || true
    sleep 0.5
  fi
  nohup python3 -m moto.server -H 127.0.0.1 -p "$SLUICE_S3_TLS_PORT" -c "$tls_dir/server.crt" -k "$tls_dir/server.key" \
    >"$SLUICE_S3_DIR/tls-server.log" 2>&1 &
  echo $! >"$SLUICE_S3_DIR/tls.pid"
  wait_up "$SLUICE_S3_DIR/tls-server.log" "$tls_endpoint/" "$tls_dir/ca.crt"
fi
# moto checks no signatures: a plain PUT makes the bucket (409 when it is there already).
python3 -c 'import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="PUT", data=b""), timeout=10, context=ctx)
except urllib.error.HTTPError as e:
    if e.code != 409:
        raise' "$tls_endpoint/$tls_bucket" "$tls_dir/ca.crt"

export SLUICE_TEST_S3_ENDPOINT="$endpoint"
export SLUICE_TEST_S3_TLS_ENDPOINT="$tls_endpoint"
export SLUICE_TEST_S3_TLS_CA="$tls_dir/ca.crt"
export SLUICE_TEST_S3_TLS_BUCKET="$tls_bucket"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
echo "S3 test server (moto) at $SLUICE_TEST_S3_ENDPOINT, over HTTPS at $SLUICE_TEST_S3_TLS_ENDPOINT (CA $SLUICE_TEST_S3_TLS_CA)"
if [[ "${1:-}" == "--print-env" ]]; then
  echo "export SLUICE_TEST_S3_ENDPOINT=$SLUICE_TEST_S3_ENDPOINT AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION"
  echo "export SLUICE_TEST_S3_TLS_ENDPOINT=$SLUICE_TEST_S3_TLS_ENDPOINT SLUICE_TEST_S3_TLS_CA=$SLUICE_TEST_S3_TLS_CA SLUICE_TEST_S3_TLS_BUCKET=$SLUICE_TEST_S3_TLS_BUCKET"
fi
