# Sourced by .ci/run: installs and starts the services the tests use, and exports where they
# are. Each step is idempotent. Without them the tests that need them print why and skip; CI
# always provides them.

# An S3-compatible server (moto) on 127.0.0.1 for the worker's S3 tests; exports
# SLUICE_TEST_S3_ENDPOINT and test credentials.
# shellcheck source=/dev/null
source scripts/s3-test-server.sh
