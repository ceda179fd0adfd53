#!/usr/bin/env bash
# The test command README.md gives a new user, and what CI runs: installs everything the suite
# needs on a fresh machine, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh --test
exec .venv/bin/python -m pytest "$@"
