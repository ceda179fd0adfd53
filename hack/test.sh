#!/usr/bin/env bash
# The test command README.md gives a new user, and what CI runs: installs everything the suite
# needs on a fresh machine, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh --test
# As root the packages above are installed, so the podman CDI test must run: a missing runtime fails it
# instead of skipping it silently.
if [ "$(id -u)" -eq 0 ]; then
  export PARTITA_REQUIRE_PODMAN=1
fi
# Likewise helm and shellcheck, which setup installs as root on x86-64 (shellcheck from Debian, helm from
# a PyPI wheel that bundles the x86-64 binary): there the chart and script tests must run, not skip.
if [ "$(id -u)" -eq 0 ] && [ "$(uname -m)" = x86_64 ]; then
  export PARTITA_REQUIRE_TOOLS=1
fi
exec .venv/bin/python -m pytest "$@"
