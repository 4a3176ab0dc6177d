#!/usr/bin/env bash
# End-to-end image benchmark, registry to registry, ours against the reference in
# one run, on the same image in the same local registry:
#   1. convert:  `ctr-remote image convert --estargz --oci SRC DST` (ours) vs Debian's
#      reference `ctr-remote image pull` + `image convert --estargz --oci` +
#      `image push` on a private containerd 1.6 started here.
#   2. optimize: `ctr-remote image optimize --oci` (ours) vs the reference's
#      `image pull` + `image optimize --oci` + `image push`, same workload.
# Wall time, CPU time (the client's, plus the private containerd's for the
# reference) and output size (sum of the layer blobs) are printed as a table.
#
#   sudo bench/image.sh            (needs root, runc, containerd, docker-registry, skopeo)
#   OURS=path/to/ctr-remote SRC_TREE=usr/lib/go-1.19 bench/image.sh   (skip the build; other tree)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/registry.sh
[[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }
target_dir=${CARGO_TARGET_DIR:-target}
if [[ -z ${OURS:-} ]]; then
  cargo build --release -q -p cli --bin ctr-remote
fi
ours=${OURS:-$target_dir/release/ctr-remote}
ref=/usr/bin/ctr-remote
work=$(mktemp -d /var/tmp/stargz-image-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  umount -R "$work/ctd/root" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The image: busybox as /bin/sh, the Go toolchain tree (a few hundred MB of real
# files with their parent directories), and an entrypoint that reads the sources
# of the first 150 files of the pkg tree.
src_tree=${SRC_TREE:-usr/lib/go-1.19}
[[ -d /$src_tree ]] || src_tree=usr/lib/x86_64-linux-gnu
mkdir -p "$work/img/base/bin" "$work/img/app" "$work/layout/blobs/sha256"
cp /bin/busybox "$work/img/base/bin/busybox"
for a in sh cat ls env find wc sort head; do ln -s busybox "$work/img/base/bin/$a"; done
mkdir -p "$work/img/base/etc" "$work/img/base/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$work/img/base/etc/passwd"
printf 'root:x:0:\n' > "$work/img/base/etc/group"
printf '#!/bin/sh\ncat $(find /%s/pkg -type f | sort | head -150) | wc -c\necho done\n' "$src_tree" > "$work/img/app/run.sh"
chmod 755 "$work/img/app/run.sh"
layer() { # name tar-args... -> prints "digest size diffid"
  local name=$1; shift
  tar --numeric-owner --owner=0 --group=0 -cf "$work/$name.tar" "$@"
  local diff; diff=$(sha256sum "$work/$name.tar" | cut -d' ' -f1)
  gzip -6 -n -c "$work/$name.tar" > "$work/$name.tgz"
  local dig; dig=$(sha256sum "$work/$name.tgz" | cut -d' ' -f1)
  mv "$work/$name.tgz" "$work/layout/blobs/sha256/$dig"
  rm "$work/$name.tar"
  echo "$dig $(stat -c %s "$work/layout/blobs/sha256/$dig") $diff"
}
l0=$(layer base -C "$work/img/base" .)
parents=(); p=$(dirname "$src_tree"); while [[ $p != . ]]; do parents=("$p" "${parents[@]}"); p=$(dirname "$p"); done
l1=$(layer tree -C / --no-recursion "${parents[@]}" --recursion "$src_tree")
l2=$(layer app -C "$work/img/app" .)
python3 - "$work/layout" "$l0" "$l1" "$l2" <<'PY'
import hashlib, json, sys, os
out, *layers = sys.argv[1:]
ls = [l.split() for l in layers]
def put(b):
    d = hashlib.sha256(b).hexdigest()
    open(os.path.join(out, "blobs/sha256", d), "wb").write(b)
    return "sha256:" + d, len(b)
cfg = json.dumps({"architecture": "amd64", "os": "linux",
    "config": {"Entrypoint": ["/run.sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + l[2] for l in ls]}}).encode()
cd, cs = put(cfg)
man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:" + l[0], "size": int(l[1])} for l in ls]}).encode()
md, ms = put(man)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]},
    open(os.path.join(out, "index.json"), "w"))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
PY

# A local registry and a private containerd.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start_registry "$work/reg" "127.0.0.1:$port"; pids+=("$REGISTRY_PID")
reg=127.0.0.1:$port
mkdir -p "$work/ctd"
cat > "$work/ctd/config.toml" <<TOML
version = 2
root = "$work/ctd/root"
state = "$work/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/ctd/sock"
[ttrpc]
  address = "$work/ctd/sock.ttrpc"
TOML
containerd --config "$work/ctd/config.toml" > "$work/ctd/log" 2>&1 & ctd_pid=$!; pids+=($ctd_pid)
for _ in $(seq 100); do [[ -S $work/ctd/sock ]] && curl -fs "http://$reg/v2/" >/dev/null && break; sleep 0.1; done
skopeo copy -q --dest-tls-verify=false "oci:$work/layout:v1" "docker://$reg/src/go:v1"
R="$ref --address $work/ctd/sock --namespace bench"

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime+stime in ticks
hz=$(getconf CLK_TCK)
# measure NAME "COMMAND LINE" : wall, client CPU (children of this shell) and containerd CPU.
declare -A wall cpu
measure() {
  local name=$1 cmd=$2
  local c0 t0 t1 c1
  c0=$(cpu_of "$ctd_pid"); t0=$(date +%s%N)
  /usr/bin/time -f "%U %S" -o "$work/time.$name" bash -euc "$cmd" > "$work/out.$name" 2>&1 || { cat "$work/out.$name" >&2; exit 1; }
  t1=$(date +%s%N); c1=$(cpu_of "$ctd_pid")
  read -r u s < "$work/time.$name"
  wall[$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b-a)/1e9}')
  cpu[$name]=$(awk -v u="$u" -v s="$s" -v c=$((c1 - c0)) -v hz="$hz" 'BEGIN{printf "%.2f", u + s + c / hz}')
}
layers_size() { # REF -> sum of layer sizes in the registry's manifest
  skopeo inspect --raw --tls-verify=false "docker://$1" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]))'
}

# 1. Convert.
measure ours_convert "$ours image convert --estargz --oci docker://$reg/src/go:v1 $reg/ours/go:esgz"
measure ref_convert "$R image pull --plain-http $reg/src/go:v1
  $R image convert --estargz --oci $reg/src/go:v1 $reg/ref/go:esgz
  $R image push --plain-http $reg/ref/go:esgz"
# 2. Optimize (same workload: the image's entrypoint; period 10 s is the default,
# the workload exits well before).
$R image rm "$reg/src/go:v1" "$reg/ref/go:esgz" > /dev/null
measure ours_optimize "$ours image optimize --oci --record-out $work/ours.rec docker://$reg/src/go:v1 $reg/ours/go:opt"
measure ref_optimize "$R image pull --plain-http $reg/src/go:v1
  $R image optimize --oci --record-out $work/ref.rec $reg/src/go:v1 $reg/ref/go:opt
  $R image push --plain-http $reg/ref/go:opt"

in_b=$(layers_size "$reg/src/go:v1")
python3 - "$in_b" "$(uptime)" \
  "${wall[ours_convert]} ${cpu[ours_convert]} $(layers_size "$reg/ours/go:esgz")" \
  "${wall[ref_convert]} ${cpu[ref_convert]} $(layers_size "$reg/ref/go:esgz")" \
  "${wall[ours_optimize]} ${cpu[ours_optimize]} $(layers_size "$reg/ours/go:opt") $(wc -l < "$work/ours.rec")" \
  "${wall[ref_optimize]} ${cpu[ref_optimize]} $(layers_size "$reg/ref/go:opt") $(wc -l < "$work/ref.rec")" <<'PY'
import sys
inb, up, oc, rc, oo, ro = sys.argv[1:]
oc, rc, oo, ro = [list(map(float, x.split())) for x in (oc, rc, oo, ro)]
print(f"source image: 3 gzip layers, {int(inb):,} bytes; {up.strip()}")
print()
print("| run | wall (s) | CPU (s) | output layers (bytes) | files recorded |")
print("|---|---:|---:|---:|---:|")
print(f"| convert, stargz-rs | {oc[0]:.2f} | {oc[1]:.2f} | {int(oc[2]):,} | |")
print(f"| convert, reference (pull + convert + push) | {rc[0]:.2f} | {rc[1]:.2f} | {int(rc[2]):,} | |")
print(f"| optimize, stargz-rs | {oo[0]:.2f} | {oo[1]:.2f} | {int(oo[2]):,} | {int(oo[3])} |")
print(f"| optimize, reference (pull + optimize + push) | {ro[0]:.2f} | {ro[1]:.2f} | {int(ro[2]):,} | {int(ro[3])} |")
print()
print(f"convert: {rc[0]/oc[0]:.2f}x faster (wall), {rc[1]/oc[1]:.2f}x less CPU, output {100*(oc[2]/rc[2]-1):+.2f}% vs reference")
print(f"optimize: {ro[0]/oo[0]:.2f}x faster (wall), {ro[1]/oo[1]:.2f}x less CPU, output {100*(oo[2]/ro[2]-1):+.2f}% vs reference")
PY
echo
echo "files recorded (ours | reference):"
paste -d'|' <(python3 -c 'import json,sys; [print(json.loads(l)["path"]) for l in open(sys.argv[1])]' "$work/ours.rec") \
  <(python3 -c 'import json,sys; [print(json.loads(l)["path"]) for l in open(sys.argv[1])]' "$work/ref.rec")
