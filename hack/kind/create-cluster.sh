#!/usr/bin/env bash
# Creates a kind cluster for Partita: DRA with the features Partita uses (device taints for controller
# mode, partitionable devices for dynamic MIG, consumable capacity for shared GPUs) and CDI enabled in
# containerd. Kubernetes 1.34 or newer; the node image is KIND_NODE_IMAGE (default in common.sh).
set -euo pipefail
# shellcheck source=hack/kind/common.sh
source "$(dirname "$0")/common.sh"

need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl
need "${CONTAINER_TOOL}" "kind needs a container engine (set CONTAINER_TOOL=podman to use podman)"

if cluster_exists; then
  log "kind cluster ${KIND_CLUSTER_NAME} exists already; delete it with hack/kind/delete-cluster.sh to start over"
  exit 0
fi

config=$(mktemp)
trap 'rm -f "${config}"' EXIT
cat >"${config}" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: ${KIND_CLUSTER_NAME}
# DRA itself is GA (on) since 1.34; these are alpha in 1.34/1.35 and beta (on) from 1.36.
featureGates:
  DRADeviceTaints: true
  DRAPartitionableDevices: true
  DRAConsumableCapacity: true
containerdConfigPatches:
# containerd 1.7 (config version 2): CDI is off unless enabled; containerd 2.x enables it by default
# and reads the same spec directories (/etc/cdi, /var/run/cdi).
- |-
  [plugins."io.containerd.grpc.v1.cri"]
    enable_cdi = true
nodes:
- role: control-plane
- role: worker
  labels:
    partita.dev/fake-gpus: "true"
- role: worker
  labels:
    partita.dev/fake-gpus: "true"
YAML

log "creating kind cluster ${KIND_CLUSTER_NAME} (${KIND_NODE_IMAGE})"
KIND_EXPERIMENTAL_PROVIDER=$([ "${CONTAINER_TOOL}" = podman ] && echo podman || echo docker) \
  kind create cluster --name "${KIND_CLUSTER_NAME}" --image "${KIND_NODE_IMAGE}" --config "${config}" --wait 120s
kubectl_kind get nodes -o wide
resources=$(kubectl_kind api-resources --api-group=resource.k8s.io -o name)
case "${resources}" in
  *resourceslices*) ;;
  *) die "the cluster does not serve resource.k8s.io ResourceSlices; use a Kubernetes 1.34+ node image" ;;
esac
