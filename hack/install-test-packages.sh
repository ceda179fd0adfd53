#!/usr/bin/env bash
# Installs the Debian packages the tests use when they are missing: podman, runc and
# busybox-static (a real container runtime consumes Partita's CDI specs) and shellcheck.
set -euo pipefail

packages=()
command -v podman >/dev/null 2>&1 || packages+=(podman)
command -v runc >/dev/null 2>&1 || packages+=(runc)
[ -x /bin/busybox ] || packages+=(busybox-static)
command -v shellcheck >/dev/null 2>&1 || packages+=(shellcheck)
[ "${#packages[@]}" -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "warning: apt-get not found; install ${packages[*]} yourself (tests that need them are skipped)" >&2
  exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
    echo "warning: not root and no sudo; cannot install ${packages[*]} (tests that need them are skipped)" >&2
    exit 0
  fi
fi
echo "Installing Debian packages: ${packages[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
