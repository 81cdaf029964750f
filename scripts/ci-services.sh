# Sourced by .ci/run: installs and starts the services the tests use, and exports where they
# are. Each step is idempotent. Without them the tests that need them print why and skip; CI
# always provides them.

# S3-compatible servers (moto) on 127.0.0.1 for the S3 tests: plain HTTP (exports
# SLUICE_TEST_S3_ENDPOINT and test credentials) and HTTPS with a CA made at start-up for the
# `spec.storage.caBundle` tests (exports SLUICE_TEST_S3_TLS_ENDPOINT, SLUICE_TEST_S3_TLS_CA and
# SLUICE_TEST_S3_TLS_BUCKET).
# shellcheck source=/dev/null
source scripts/s3-test-server.sh

# The official OpenAI Python client for the Batch API test (cli/tests/serve_openai.rs runs
# tests/openai/test_batch_api.py against `sluice serve --local`).
if ! python3 -c 'import openai, sys; sys.exit(openai.__version__ != "3.63.0")' 2>/dev/null; then
  python3 -m pip install -q 'openai==3.63.0'
fi
