#!/usr/bin/env bash
# Deletes the kind cluster (and with it everything the demo created).
set -euo pipefail
# shellcheck source=hack/kind/common.sh
source "$(dirname "$0")/common.sh"

need kind
if cluster_exists; then
  log "deleting kind cluster ${KIND_CLUSTER_NAME}"
  kind delete cluster --name "${KIND_CLUSTER_NAME}"
else
  log "no kind cluster ${KIND_CLUSTER_NAME}"
fi
