#!/usr/bin/env bash
# Prepares a fresh clone: a virtualenv in .venv with Partita installed (editable).
#   hack/setup.sh          runtime only (enough for `partita sandbox`)
#   hack/setup.sh --test   also the test tools: the Debian packages podman, runc, busybox-static
#                          and ShellCheck, the Python test extras, and helm (hack/install-tools.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=false
[ "${1:-}" = "--test" ] && want_test=true

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "Partita needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1))." >&2
  exit 1
fi

if $want_test; then
  hack/install-test-packages.sh
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
    # Debian and Ubuntu ship venv/ensurepip separately.
    ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    sudo=()
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "python${ver}-venv" >/dev/null || \
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if $want_test; then
  .venv/bin/python -m pip install --quiet -e '.[test]'
  hack/install-tools.sh
else
  .venv/bin/python -m pip install --quiet -e .
fi
