#!/usr/bin/env bash
# Prepares a fresh clone: a virtualenv in .venv with Partita installed (editable) from the hashed locks.
#   hack/setup.sh          runtime only, from requirements-runtime.lock (enough for `partita sandbox`)
#   hack/setup.sh --test   everything the suite needs: requirements.lock (runtime + test), the Debian packages
#                          podman, runc, busybox-static and ShellCheck, and helm (hack/install-tools.sh)
# Every Python package comes from a lock (exact versions, sha256-checked; refresh with hack/lock.sh).
# A re-run installs nothing when neither pyproject.toml nor the lock changed since the last install.
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

# What is installed is recorded in .venv/partita-installed as "<mode> <sha256 of pyproject.toml + lock>"; the
# full (test) install also satisfies a runtime-only request.
stamp=.venv/partita-installed
fingerprint() { cat pyproject.toml "$1" | sha256sum | cut -d' ' -f1; }
test_fp="test $(fingerprint requirements.lock)"
runtime_fp="runtime $(fingerprint requirements-runtime.lock)"
have=$(cat "$stamp" 2>/dev/null || true)
if $want_test; then lock=requirements.lock want=$test_fp; else lock=requirements-runtime.lock want=$runtime_fp; fi

if [ "$have" != "$want" ] && { $want_test || [ "$have" != "$test_fp" ]; }; then
  echo "Installing Python packages from $lock into .venv"
  rm -f "$stamp"
  pip=(.venv/bin/python -m pip --disable-pip-version-check --no-input)
  # Hash-checking mode: every package, dependencies included, must be in the lock with a matching sha256.
  "${pip[@]}" install --quiet --require-hashes --only-binary=:all: -r "$lock"
  # The project itself, from this checkout, with the locked setuptools (no download of a build backend).
  "${pip[@]}" install --quiet --no-deps --no-build-isolation --editable .
  "${pip[@]}" check >/dev/null || { "${pip[@]}" check >&2; exit 1; }
  echo "$want" > "$stamp"
fi

if $want_test; then
  hack/install-tools.sh
fi
