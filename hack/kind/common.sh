#!/usr/bin/env bash
# Shared settings and helpers of the kind scripts. Source it; every value can be overridden from the
# environment, e.g. KIND_NODE_IMAGE=kindest/node:v1.35.1 hack/kind/create-cluster.sh
# shellcheck disable=SC2034  # the variables are used by the scripts that source this file

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KIND_CLUSTER_NAME=${KIND_CLUSTER_NAME:-partita}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.36.1}
IMAGE_REPOSITORY=${IMAGE_REPOSITORY:-localhost/partita}
IMAGE_TAG=${IMAGE_TAG:-dev}
HELM_RELEASE=${HELM_RELEASE:-partita}
HELM_NAMESPACE=${HELM_NAMESPACE:-partita-system}
CONTAINER_TOOL=${CONTAINER_TOOL:-docker}
KUBE_CONTEXT="kind-${KIND_CLUSTER_NAME}"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# need TOOL [hint]: fail early, saying what to install, instead of half-way through.
need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is required${2:+: $2}"
}

# helm: the one on PATH, else the one hack/install-tools.sh put into .cache/tools/bin.
helm_bin() {
  if command -v helm >/dev/null 2>&1; then
    command -v helm
  elif [ -x "${REPO_ROOT}/.cache/tools/bin/helm" ]; then
    printf '%s\n' "${REPO_ROOT}/.cache/tools/bin/helm"
  else
    die "helm is required: install Helm 3.14+ or 4, or run hack/install-tools.sh"
  fi
}

kubectl_kind() { kubectl --context "${KUBE_CONTEXT}" "$@"; }

cluster_exists() {
  kind get clusters 2>/dev/null | grep -qx "${KIND_CLUSTER_NAME}"
}
