#!/usr/bin/env bash
# Installs the chart into the kind cluster with fake GPUs (8 x H100 per worker by default; pass extra
# helm arguments after the script, e.g. --set allocationMode=scheduler), then waits for every worker's
# plugin to publish its ResourceSlices.
set -euo pipefail
# shellcheck source=hack/kind/common.sh
source "$(dirname "$0")/common.sh"

need kubectl
helm=$(helm_bin)
cluster_exists || die "no kind cluster ${KIND_CLUSTER_NAME}; run hack/kind/create-cluster.sh first"

workers=$(kubectl_kind get nodes -l partita.dev/fake-gpus=true -o name | wc -l)
[ "${workers}" -gt 0 ] || die "no node is labelled partita.dev/fake-gpus=true, so no plugin runs;" \
  "create the cluster with hack/kind/create-cluster.sh or label the nodes (kubectl label node NAME partita.dev/fake-gpus=true)"

log "installing ${HELM_RELEASE} into namespace ${HELM_NAMESPACE}"
"${helm}" upgrade --install "${HELM_RELEASE}" "${REPO_ROOT}/charts/partita" \
  --kube-context "${KUBE_CONTEXT}" --namespace "${HELM_NAMESPACE}" --create-namespace \
  --set image.repository="${IMAGE_REPOSITORY}" --set image.tag="${IMAGE_TAG}" --set image.pullPolicy=Never \
  --set fakeGpu.enabled=true \
  --set-string 'plugin.nodeSelector.partita\.dev/fake-gpus=true' \
  --wait --timeout 5m "$@"

log "waiting for ResourceSlices from ${workers} node(s)"
for _ in $(seq 1 60); do
  nodes=$(kubectl_kind get resourceslices -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' \
    | sort -u | grep -c . || true)
  if [ "${nodes}" -ge "${workers}" ]; then
    kubectl_kind get resourceslices
    exit 0
  fi
  sleep 2
done
kubectl_kind -n "${HELM_NAMESPACE}" logs -l app.kubernetes.io/component=kubelet-plugin --tail=50 >&2 || true
die "only ${nodes} of ${workers} node(s) published ResourceSlices within 120s (plugin logs above)"
