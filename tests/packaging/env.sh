# Sourced by tests/packaging/run.sh and scripts/render-install.sh: makes sure the packaging
# tools are installed (idempotently, quietly) and sets PY to the virtualenv's python.
#   helm-python-sdk, kubernetes-validate, PyYAML, pytest  -> a virtualenv (PyPI)
#   promtool                                              -> Debian's prometheus package
# Set SLUICE_PACKAGING_VENV to place the virtualenv elsewhere.

SLUICE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SLUICE_PACKAGING_VENV="${SLUICE_PACKAGING_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/sluice/packaging-venv}"

_sluice_as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root for: $*" >&2; return 1; fi
}

_sluice_apt_updated=""
_sluice_apt_install() {
  if [ -z "$_sluice_apt_updated" ]; then
    _sluice_as_root apt-get update -qq >/dev/null
    _sluice_apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive _sluice_as_root apt-get install -y -qq \
    --no-install-recommends "$@" >/dev/null
}

sluice_python_env() {
  local req="$SLUICE_ROOT/tests/packaging/requirements.txt"
  local stamp="$SLUICE_PACKAGING_VENV/.requirements.sha256"
  local want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ ! -x "$SLUICE_PACKAGING_VENV/bin/python" ]; then
    mkdir -p "$(dirname "$SLUICE_PACKAGING_VENV")"
    if ! python3 -m venv "$SLUICE_PACKAGING_VENV" >/dev/null 2>&1; then
      # Debian's python3 needs python3-venv for ensurepip.
      rm -rf "$SLUICE_PACKAGING_VENV"
      _sluice_apt_install python3-venv
      python3 -m venv "$SLUICE_PACKAGING_VENV"
    fi
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$SLUICE_PACKAGING_VENV/bin/python" -m pip install -q --disable-pip-version-check \
      -r "$req"
    echo "$want" >"$stamp"
  fi
  PY="$SLUICE_PACKAGING_VENV/bin/python"
}

sluice_promtool() {
  command -v promtool >/dev/null && return 0
  _sluice_apt_install prometheus
  # Only promtool is wanted: where systemd started the Prometheus server, stop it.
  if [ -d /run/systemd/system ]; then
    _sluice_as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  command -v promtool >/dev/null
}
