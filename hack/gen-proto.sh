#!/usr/bin/env bash
# Regenerates the Python stubs in driver/kubeletapi from proto/ with the grpcio-tools of .venv.
# The generated grpc modules import their messages by top-level path (`from dra.v1 import api_pb2`);
# that is rewritten into the package (`from driver.kubeletapi.dra.v1 import api_pb2`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
out=driver/kubeletapi
rm -rf "$out"
mkdir -p "$out"
protos=(dra/v1/api.proto dra/v1beta1/api.proto drahealth/v1/api.proto pluginregistration/v1/api.proto)
"$PYTHON" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "${protos[@]}"
for f in "$out"/*/*/api_pb2_grpc.py; do
  sed -i -E 's/^from ([a-z0-9_]+)\.([a-z0-9_]+) import api_pb2/from driver.kubeletapi.\1.\2 import api_pb2/' "$f"
done
find "$out" -type d -exec sh -c 'printf "" > "$1/__init__.py"' _ {} \;
printf '"""Generated gRPC stubs of the kubelet APIs (proto/); regenerate with hack/gen-proto.sh."""\n' > "$out/__init__.py"
