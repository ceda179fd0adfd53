#!/usr/bin/env bash
# Prepares a fresh clone: a virtualenv in .venv with Partita installed (editable).
#   hack/setup.sh          runtime only (enough for `partita sandbox`)
#   hack/setup.sh --test   also the test tools: Debian packages (podman, runc, busybox-static,
#                          shellcheck), the Python test extras and Helm (unpacked into .cache/tools)
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
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if $want_test; then
  .venv/bin/python -m pip install --quiet -e '.[test]'
else
  .venv/bin/python -m pip install --quiet -e .
fi
