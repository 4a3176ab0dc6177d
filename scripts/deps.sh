#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test stargz-rs: the system
# packages the tests start for real (registry, containerd, runc, FUSE, ...), and the
# reference checker from ../shared/oracle. Idempotent; needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  docker-registry containerd runc skopeo fuse3 protobuf-compiler
  python3 gzip tar zstd curl openssl apache2-utils iproute2 ca-certificates
  busybox-static stargz-snapshotter containernetworking-plugins bsdutils
  debootstrap fonts-dejavu-core podman
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 -qq update
  apt-get -o DPkg::Lock::Timeout=600 -qq install -y --no-install-recommends "${missing[@]}" >/dev/null
fi

# The strict Kubernetes schema checker for deploy/kubernetes (no cluster runs here).
if ! command -v kubernetes-validate >/dev/null; then
  echo "deps.sh: installing kubernetes-validate from PyPI" >&2
  python3 -m pip install -q --root-user-action=ignore kubernetes-validate >/dev/null
fi

shared=${STARGZ_SHARED_DIR:-$(cd .. && pwd)/shared}
if [[ -x "$shared/oracle/build.sh" || -f "$shared/oracle/build.sh" ]]; then
  bash "$shared/oracle/build.sh" target/oracle >/dev/null
else
  echo "deps.sh: $shared/oracle/build.sh not found; compatibility tests will fail under CI" >&2
fi
# The reference daemon, scraped beside ours by crates/stargzd/tests/compat_metrics.rs.
if [[ -f "$shared/reference/build.sh" ]]; then
  bash "$shared/reference/build.sh" target/reference >/dev/null
else
  echo "deps.sh: $shared/reference/build.sh not found; compat_metrics will fail under CI" >&2
fi
