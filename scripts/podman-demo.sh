#!/usr/bin/env bash
# Lazy pulling with Podman, from a fresh Debian (root): installs what is missing
# (scripts/deps.sh: podman, docker-registry, fuse3, ...), builds stargz-store and
# ctr-remote, and in a scratch directory starts docker-registry on loopback and
# stargz-store; builds a small image offline (busybox + 48 MiB the workload never
# reads), pushes it as an ordinary gzip image, converts it to eStargz with
# `ctr-remote image convert`, then `podman pull` + `podman run` of the eStargz image
# through the store (Podman uses a private storage.conf with
# additionallayerstores) and of the original image the ordinary way, and reports
# times and how much of the layer the lazy run fetched. Everything is stopped,
# removed and unmounted on exit, also on failure. A missing prerequisite fails under
# CI=true and skips loudly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/registry.sh

skip() {
  if [[ ${CI:-} == true ]]; then
    echo "podman-demo: $1" >&2
    exit 1
  fi
  echo "!!!!!!!! SKIPPING the Podman demo: $1 !!!!!!!!" >&2
  exit 0
}
[[ $(id -u) == 0 ]] || skip "needs root (FUSE, overlay mounts)"
bash scripts/deps.sh
for t in /usr/bin/podman /usr/bin/docker-registry /bin/busybox /dev/fuse; do
  [[ -e $t ]] || skip "$t missing (apt-get install -y podman docker-registry busybox-static fuse3)"
done
# STARGZ_BIN_DIR: binaries built already (ctr-remote, stargz-store); else a release build.
if [[ -n ${STARGZ_BIN_DIR:-} ]]; then
  bindir=$STARGZ_BIN_DIR
else
  cargo build --release -p cli -p stargz-store
  bindir=${CARGO_TARGET_DIR:-target}/release
fi
cli=$bindir/ctr-remote
store_bin=$bindir/stargz-store

work=$(mktemp -d)
pids=()
# Podman with a private storage and configuration: NAME selects <work>/NAME.conf.
pm() {
  local name=$1
  shift
  CONTAINERS_STORAGE_CONF=$work/$name.conf CONTAINERS_REGISTRIES_CONF=$work/registries.conf \
    REGISTRY_AUTH_FILE=$work/auth.json \
    podman --cgroup-manager cgroupfs --events-backend file --tmpdir "$work/$name-tmp" "$@"
}
teardown() {
  local rc=$?
  if ((rc != 0)); then
    for l in store.log registry/log; do
      [[ -f $work/$l ]] && { echo "--- $l (tail)" >&2; tail -n 30 "$work/$l" >&2; }
    done
  fi
  for n in build lazy ordinary; do
    [[ -f $work/$n.conf ]] || continue
    pm "$n" rm -af -t 0 >/dev/null 2>&1 || true
    pm "$n" rmi -af >/dev/null 2>&1 || true
  done
  # SIGINT: the store unmounts itself and its layers.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -s "${pids[i]%%:*}" "${pids[i]#*:}" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "${pids[i]#*:}" 2>/dev/null || break; sleep 0.1; done
    kill -9 "${pids[i]#*:}" 2>/dev/null || true
  done
  awk -v p="$work" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap teardown EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ms() { echo $(( ($2 - $1) / 1000000 )); }

echo "== scratch directory $work"
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$reg" "" podman-demo
pids+=("TERM:$REGISTRY_PID")
for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$reg" > "$work/registries.conf"
echo '{"auths": {}}' > "$work/auth.json"
mkdir -p "$work/store"
for n in build lazy ordinary; do
  printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' \
    "$work/$n-graph" "$work/$n-run" > "$work/$n.conf"
done
# The one line that makes Podman ask the store first.
printf '[storage.options]\nadditionallayerstores = ["%s:ref"]\n' "$work/store" >> "$work/lazy.conf"

# No prefetch or background fetch, so what is fetched is what the container read.
printf 'noprefetch = true\nno_background_fetch = true\n' > "$work/store.toml"
REGISTRY_AUTH_FILE=$work/auth.json "$store_bin" --config "$work/store.toml" \
  --root "$work/store-root" "$work/store" > "$work/store.log" 2>&1 &
pids+=("INT:$!")
for _ in $(seq 300); do grep -q " $work/store " /proc/self/mountinfo && break; sleep 0.1; done
grep -q " $work/store " /proc/self/mountinfo || { echo "podman-demo: stargz-store did not mount" >&2; exit 1; }

echo "== building a small image offline: busybox + 48 MiB the workload never reads"
rootfs=$work/rootfs
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/data"
cp /bin/busybox "$rootfs/bin/busybox"
echo "hello from a lazily pulled layer" > "$rootfs/etc/hello"
for i in 1 2 3 4 5 6; do head -c 8M /dev/urandom > "$rootfs/data/blob$i"; done
tar -C "$rootfs" --owner=0 --group=0 -c bin etc data |
  pm build import --change 'CMD ["/bin/busybox", "cat", "/etc/hello"]' - localhost/demo:plain >/dev/null

echo "== pushing it as an ordinary gzip image: $reg/demo/app:plain"
pm build push -q localhost/demo:plain "$reg/demo/app:plain"

echo "== converting it registry to registry: ctr-remote image convert --estargz --oci"
"$cli" image convert --estargz --oci --plain-http "$reg/demo/app:plain" "$reg/demo/app:estargz" | sed 's/^/   /'
img=$reg/demo/app:estargz
run=(run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

echo "== lazy: podman pull + podman run through stargz-store"
t0=$(date +%s%N)
pm lazy pull -q "$img" >/dev/null
t1=$(date +%s%N)
pm lazy "${run[@]}" "$img" | sed 's/^/   /'
t2=$(date +%s%N)
# The layer's fetch state, read through the store's tree as containers/storage sees it.
digest=$(curl -s -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$reg/v2/demo/app/manifests/estargz" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["digest"])')
b64=$(printf '%s' "$img" | base64 -w0)
state=$(cat "$work/store/$b64/$digest/diff/.stargz-snapshotter/$digest.json")
echo "   $work/store/$b64/$digest/diff -> $(readlink "$work/store/$b64/$digest/diff")"

echo "== ordinary: podman pull + podman run of the original image"
t3=$(date +%s%N)
pm ordinary pull -q "$reg/demo/app:plain" >/dev/null
t4=$(date +%s%N)
pm ordinary "${run[@]}" "$reg/demo/app:plain" | sed 's/^/   /'
t5=$(date +%s%N)

fetched=$(python3 -c 'import json, sys
s = json.loads(sys.argv[1])
print("%d of %d bytes (%.1f%%)" % (s["fetchedSize"], s["size"], s["fetchedPercent"]))' "$state")
echo
printf '%-10s %10s %10s %10s\n' "" "pull ms" "run ms" "total ms"
printf '%-10s %10s %10s %10s\n' lazy "$(ms "$t0" "$t1")" "$(ms "$t1" "$t2")" "$(ms "$t0" "$t2")"
printf '%-10s %10s %10s %10s\n' ordinary "$(ms "$t3" "$t4")" "$(ms "$t4" "$t5")" "$(ms "$t3" "$t5")"
echo "the lazy run fetched $fetched of the layer; the ordinary pull fetched all of it"
