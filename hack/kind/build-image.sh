#!/usr/bin/env bash
# Builds Partita's image from the repository's Dockerfile and loads it into the kind cluster's nodes.
set -euo pipefail
# shellcheck source=hack/kind/common.sh
source "$(dirname "$0")/common.sh"

need kind
need "${CONTAINER_TOOL}"
cluster_exists || die "no kind cluster ${KIND_CLUSTER_NAME}; run hack/kind/create-cluster.sh first"

image="${IMAGE_REPOSITORY}:${IMAGE_TAG}"
log "building ${image}"
"${CONTAINER_TOOL}" build --tag "${image}" "${REPO_ROOT}"

log "loading ${image} into kind cluster ${KIND_CLUSTER_NAME}"
if [ "${CONTAINER_TOOL}" = podman ]; then
  archive=$(mktemp --suffix=.tar)
  trap 'rm -f "${archive}"' EXIT
  podman save --output "${archive}" "${image}"
  kind load image-archive "${archive}" --name "${KIND_CLUSTER_NAME}"
else
  kind load docker-image "${image}" --name "${KIND_CLUSTER_NAME}"
fi
