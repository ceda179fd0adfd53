#!/usr/bin/env bash
# The whole kind path in one go: create the cluster, build and load the image, install the chart with
# fake GPUs, run the examples and print what each pod got. Delete it all with hack/kind/delete-cluster.sh.
set -euo pipefail
here=$(dirname "$0")
"${here}/create-cluster.sh"
"${here}/build-image.sh"
"${here}/install.sh" "$@"
"${here}/demo.sh"
