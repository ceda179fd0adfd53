#!/usr/bin/env bash
# Installs Partita into .venv and runs the sandbox: a simulated cluster with fake GPUs on this
# machine. Extra arguments go to `partita sandbox` (see `partita sandbox --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
exec .venv/bin/partita sandbox "$@"
