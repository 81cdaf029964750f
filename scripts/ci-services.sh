# Sourced by .ci/run: installs and starts the services the tests use, and exports where they are.
# Each step is idempotent; a missing service makes its tests skip with a printed reason locally,
# but CI always provides them.
if [[ -x scripts/s3-test-server.sh ]]; then
  scripts/s3-test-server.sh start
  # shellcheck source=/dev/null
  source target/s3-test-server.env
fi
