#!/usr/bin/env bash
# Applies examples/ to the kind cluster, waits for the pods, and prints each pod's node and the GPU
# environment it got from its CDI devices (NVIDIA_VISIBLE_DEVICES, PARTITA_*, CUDA_MPS_*). The example
# that asks for more GPUs than a node has stays Pending; its events say why.
set -euo pipefail
# shellcheck source=hack/kind/common.sh
source "$(dirname "$0")/common.sh"

need kubectl
cluster_exists || die "no kind cluster ${KIND_CLUSTER_NAME}; run hack/kind/create-cluster.sh first"

log "applying ${REPO_ROOT}/examples"
kubectl_kind apply -f "${REPO_ROOT}/examples"

# Deployments create their pods a moment after apply, and `kubectl wait -l` only waits for pods that exist
# when it starts: wait for the Deployments first, then for every pod.
log "waiting up to 3 minutes for the example Deployments and pods"
kubectl_kind wait deployment -l app.kubernetes.io/part-of=partita-examples \
  --for=condition=Available --timeout=180s || log "not every Deployment became available; see below"
kubectl_kind wait pod -l 'app.kubernetes.io/part-of=partita-examples,partita.dev/example-expects!=Pending' \
  --for=condition=Ready --timeout=60s || log "not every pod became ready; see below"

for pod in $(kubectl_kind get pods -l app.kubernetes.io/part-of=partita-examples -o name); do
  phase=$(kubectl_kind get "${pod}" -o jsonpath='{.status.phase}')
  node=$(kubectl_kind get "${pod}" -o jsonpath='{.spec.nodeName}')
  printf '\n%s  %s  %s\n' "${pod#pod/}" "${phase}" "${node:--}"
  if [ "${phase}" = Running ]; then
    kubectl_kind exec "${pod}" -- sh -c 'env | grep -E "^(NVIDIA|PARTITA|CUDA_MPS)_" | sort' | sed 's/^/    /'
  else
    kubectl_kind get events --field-selector "involvedObject.name=${pod#pod/}" \
      -o jsonpath='{range .items[*]}    {.reason}: {.message}{"\n"}{end}'
  fi
done
