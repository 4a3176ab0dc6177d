#!/usr/bin/env bash
# The main job, in two parts.
# 1. Builds ctr-remote, makes a sample layer tar, converts it to eStargz with prioritized
#    files, verifies it with our verifier and (when available) with the reference's
#    library, and prints its TOC digest and the layer annotations.
# 2. Lazy pulling for real (root only): builds a small image offline, pushes it to a
#    scratch docker-registry as an ordinary gzip image and converts it registry to
#    registry with `ctr-remote image convert`. Then, over the project's own shaped
#    link (`linkshape`, profile wan: 20 ms round trip, 100 Mbit/s; the registry in one
#    network namespace, containerd, our containerd-stargz-grpc and the clients in the
#    other), it warms both paths up with a throwaway container each (the first start
#    on a machine pays one-time costs that belong to neither), pulls the eStargz image
#    lazily with `ctr-remote image rpull` and runs it, pulls and runs the original with
#    an ordinary `ctr images pull`, and prints both timings and how much of the layer
#    was fetched. Everything is stopped and unmounted on exit, also on failure.
#    A missing prerequisite fails under CI=true and skips part 2 loudly otherwise;
#    without TUN/tc for the link it runs on loopback and says so (fails under CI=true).
#    LINK_PROFILE=lan|wan|slow picks another link.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/registry.sh
# ---------------------------------------------------------------------------------------
# Part 2b, in the client namespace of the shaped link (or on loopback): the registry
# serves the pushed images from STORAGE at ADDR (inside SERVER_NS when given), and
# containerd and our daemon run here, so every byte they fetch crosses the link.
#   over_link WORK BIN_DIR ADDR STORAGE_DIR [SERVER_NS]
over_link() {
  # Globals, not locals: the EXIT trap runs after this function has returned.
  work=$1 addr=$3 storage=$4 netns=${5:-}
  bin=$2/ctr-remote daemon_bin=$2/containerd-stargz-grpc
  pids=()
  inner_teardown() {
    local rc=$?
    if ((rc != 0)); then
      for l in stargz.log containerd.log registry-link/log; do
        [[ -f $work/$l ]] && { echo "--- $l (tail)" >&2; tail -n 30 "$work/$l" >&2; }
      done
    fi
    # containerd first so it stops its shims while the snapshotter still answers;
    # SIGINT makes our daemon unmount its FUSE layers (and stop its FUSE manager).
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
      kill -s "${pids[i]%%:*}" "${pids[i]#*:}" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "${pids[i]#*:}" 2>/dev/null || break; sleep 0.1; done
      kill -9 "${pids[i]#*:}" 2>/dev/null || true
    done
    local mpid
    mpid=$(cat "$work/stargz-root/fuse-manager.pid" 2>/dev/null || true)
    if [[ -n $mpid ]] && grep -qa stargz-fuse-manager "/proc/$mpid/cmdline" 2>/dev/null; then
      kill -9 "$mpid" 2>/dev/null || true
    fi
    awk -v p="$work" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r |
      while read -r m; do umount -l "$m" 2>/dev/null || true; done
  }
  trap inner_teardown EXIT
  wait_sock() {
    for _ in $(seq 300); do [[ -S $1 ]] && return 0; sleep 0.1; done
    echo "demo: $2 did not come up" >&2
    exit 1
  }
  ms() { echo $(( ($2 - $1) / 1000000 )); }

  # The same storage the images were pushed to, now behind the link.
  mkdir -p "$work/registry-link"
  ln -sfn "$storage" "$work/registry-link/storage"
  start_registry "$work/registry-link" "$addr" "$netns" demo-secret
  pids+=("TERM:$REGISTRY_PID")
  for _ in $(seq 300); do curl -sf "http://$addr/v2/" >/dev/null && break; sleep 0.1; done
  curl -sf "http://$addr/v2/" >/dev/null || { echo "demo: registry at $addr did not come up" >&2; exit 1; }

  # No prefetch or background fetch, so what is fetched is what the container read.
  # The registry speaks plain HTTP at an address that is not loopback.
  cat > "$work/stargz.toml" <<TOML
noprefetch = true
no_background_fetch = true
[[resolver.host."$addr".mirrors]]
host = "$addr"
insecure = true
TOML
  "$daemon_bin" --address "$work/run/stargz.sock" --root "$work/stargz-root" \
    --config "$work/stargz.toml" > "$work/stargz.log" 2>&1 &
  pids+=("INT:$!")
  wait_sock "$work/run/stargz.sock" containerd-stargz-grpc
  cat > "$work/containerd.toml" <<TOML
version = 2
root = "$work/containerd-root"
state = "$work/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$work/opt"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "$work/run/stargz.sock"
TOML
  containerd --config "$work/containerd.toml" > "$work/containerd.log" 2>&1 &
  pids+=("TERM:$!")
  wait_sock "$work/containerd.sock" containerd
  local ctr=(ctr -a "$work/containerd.sock" -n demo)
  for _ in $(seq 100); do "${ctr[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done

  echo "== warming up: one throwaway container through each snapshotter"
  "$bin" -a "$work/containerd.sock" -n demo image rpull --plain-http --snapshotter stargz \
    "$addr/demo/warm:estargz" >/dev/null
  "${ctr[@]}" run --rm --snapshotter stargz "$addr/demo/warm:estargz" warm1 /bin/busybox true
  "${ctr[@]}" images pull --plain-http --snapshotter overlayfs "$addr/demo/warm:plain" >/dev/null
  "${ctr[@]}" run --rm --snapshotter overlayfs "$addr/demo/warm:plain" warm2 /bin/busybox true

  local img=$addr/demo/app:estargz plain=$addr/demo/app:plain
  local script='cat /etc/hello; cat /.stargz-snapshotter/*.json'
  echo "== lazy: ctr-remote image rpull + ctr run, snapshotter stargz"
  local t0 t1 t2 t3 t4 t5 lazy_out
  t0=$(date +%s%N)
  "$bin" -a "$work/containerd.sock" -n demo image rpull --plain-http --snapshotter stargz "$img" | sed 's/^/   /'
  t1=$(date +%s%N)
  lazy_out=$("${ctr[@]}" run --rm --snapshotter stargz "$img" lazy /bin/busybox sh -c "$script")
  t2=$(date +%s%N)
  echo "$lazy_out" | sed 's/^/   /'

  echo "== ordinary: ctr images pull + ctr run of the original image, snapshotter overlayfs"
  t3=$(date +%s%N)
  "${ctr[@]}" images pull --plain-http --snapshotter overlayfs "$plain" >/dev/null
  t4=$(date +%s%N)
  "${ctr[@]}" run --rm --snapshotter overlayfs "$plain" plain /bin/busybox cat /etc/hello | sed 's/^/   /'
  t5=$(date +%s%N)

  local fetched
  fetched=$(printf '%s\n' "$lazy_out" | python3 -c '
import json, sys
for l in sys.stdin:
    if l.startswith("{"):
        s = json.loads(l)
        print("%d of %d bytes (%.1f%%)" % (s["fetchedSize"], s["size"], s["fetchedPercent"]))')
  echo
  echo "link: ${LINK_DESC:-loopback}"
  printf '%-10s %10s %10s %10s\n' "" "pull ms" "run ms" "total ms"
  printf '%-10s %10s %10s %10s\n' lazy "$(ms "$t0" "$t1")" "$(ms "$t1" "$t2")" "$(ms "$t0" "$t2")"
  printf '%-10s %10s %10s %10s\n' ordinary "$(ms "$t3" "$t4")" "$(ms "$t4" "$t5")" "$(ms "$t3" "$t5")"
  echo "lazy pull fetched $fetched of the layer; the ordinary pull fetched all of it"
  echo "(after one warm-up container per snapshotter; each timing is a single run)"
}

if [[ ${1:-} == --over-link ]]; then
  shift
  over_link "$@"
  exit
fi
bash scripts/deps.sh
cargo build --release -p cli -p stargzd -p linkshape
tgt=${CARGO_TARGET_DIR:-target}
bin=$tgt/release/ctr-remote
daemon_bin=$tgt/release/containerd-stargz-grpc
work=$(mktemp -d)
pids=()
teardown() {
  local rc=$?
  if ((rc != 0)); then
    for l in stargz.log containerd.log registry/log; do
      [[ -f $work/$l ]] && { echo "--- $l (tail)" >&2; tail -n 30 "$work/$l" >&2; }
    done
  fi
  # containerd first so it stops its shims while the snapshotter still answers;
  # SIGINT makes our daemon unmount its FUSE layers.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -s "${pids[i]%%:*}" "${pids[i]#*:}" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "${pids[i]#*:}" 2>/dev/null || break; sleep 0.1; done
    kill -9 "${pids[i]#*:}" 2>/dev/null || true
  done
  # SIGINT stops the FUSE manager too; this only catches a daemon that had to be killed.
  local mpid
  mpid=$(cat "$work/stargz-root/fuse-manager.pid" 2>/dev/null || true)
  if [[ -n $mpid ]] && grep -qa stargz-fuse-manager "/proc/$mpid/cmdline" 2>/dev/null; then
    kill -9 "$mpid" 2>/dev/null || true
  fi
  if [[ -r /proc/self/mountinfo ]]; then
    awk -v p="$work" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r |
      while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  rm -rf "$work"
}
trap teardown EXIT

python3 crates/cli/tests/fixtures/mktars.py "$work" >/dev/null
tar=$work/pax-prio.tar
echo "== sample layer: $(du -h "$tar" | cut -f1) tar, prioritized files:"
sed 's/^/   /' "$work/pax-prio.prio"

echo "== converting to eStargz"
start=$(date +%s%N)
"$bin" blob build --prioritized-files "$work/pax-prio.prio" --json "$tar" "$work/layer.estargz" > "$work/build.json"
end=$(date +%s%N)
cat "$work/build.json"
toc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tocDigest"])' "$work/build.json")
echo "== converted in $(( (end - start) / 1000000 )) ms"

echo "== verifying (every chunk, every file, against the original tar)"
"$bin" blob verify --toc-digest "$toc" --tar "$tar" "$work/layer.estargz"

oracle=target/oracle/estargz-oracle
if [[ -x $oracle ]]; then
  echo "== verifying with the reference implementation's library"
  "$oracle" verify --toc-digest "$toc" "$work/layer.estargz" "$tar" | python3 -c 'import json,sys; v=json.load(sys.stdin); print("reference verify:", "OK" if v["ok"] else v)'
fi
echo "TOC digest: $toc"

# ---------------------------------------------------------------------------------------
# Part 2: lazy pull through containerd, over a shaped link.
skip() {
  if [[ ${CI:-} == true ]]; then
    echo "demo: $1" >&2
    exit 1
  fi
  echo "!!!!!!!! SKIPPING the lazy-pull demo: $1 !!!!!!!!" >&2
  exit 0
}
[[ $(id -u) == 0 ]] || skip "needs root (containerd, FUSE, overlay mounts)"
for t in /usr/bin/containerd /usr/bin/ctr /usr/bin/ctr-remote /usr/sbin/runc \
  /usr/bin/docker-registry /bin/busybox /dev/fuse; do
  [[ -e $t ]] || skip "$t missing (apt-get install -y containerd runc docker-registry stargz-snapshotter busybox-static fuse3)"
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo
echo "== part 2: lazy pull through containerd (scratch dir $work)"
port=$(free_port)
reg=127.0.0.1:$port
start_registry "$work/registry" "$reg" "" demo-secret
pids+=("TERM:$REGISTRY_PID")
for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

echo "== building two small images offline"
echo "   demo/app: busybox + 48 MiB the workload never reads; demo/warm: busybox alone"
rootfs=$work/rootfs
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/data"
cp /bin/busybox "$rootfs/bin/busybox"
echo "hello from a lazily pulled layer" > "$rootfs/etc/hello"
for i in 1 2 3 4 5 6; do head -c 8M /dev/urandom > "$rootfs/data/blob$i"; done
tar -C "$rootfs" --owner=0 --group=0 -cf "$work/app.tar" bin etc data
tar -C "$rootfs" --owner=0 --group=0 -cf "$work/warm.tar" bin etc

echo "== pushing them as ordinary gzip images to $reg (loopback: setup, not measured)"
python3 - "$work" "$reg" <<'PY'
import gzip, hashlib, json, sys, urllib.request
work, reg = sys.argv[1], sys.argv[2]
for name, cmd in (("app", ["/bin/busybox", "cat", "/etc/hello"]), ("warm", ["/bin/busybox", "true"])):
    base = f"http://{reg}/v2/demo/{name}"
    def push(data):
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        r = urllib.request.urlopen(urllib.request.Request(base + "/blobs/uploads/", method="POST"))
        loc = r.headers["Location"]
        loc = loc if loc.startswith("http") else f"http://{reg}{loc}"
        sep = "&" if "?" in loc else "?"
        urllib.request.urlopen(urllib.request.Request(f"{loc}{sep}digest={d}", data=data, method="PUT",
            headers={"Content-Type": "application/octet-stream"}))
        return d
    tar = open(f"{work}/{name}.tar", "rb").read()
    blob = gzip.compress(tar, 6, mtime=0)
    layer = push(blob)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]}}).encode()
    manifest = json.dumps({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": push(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer,
                    "size": len(blob)}]}).encode()
    urllib.request.urlopen(urllib.request.Request(base + "/manifests/plain", data=manifest, method="PUT",
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}))
    print(f"   demo/{name}:plain layer {layer}: {len(blob)} bytes")
PY

echo "== converting them registry to registry: ctr-remote image convert --estargz --oci"
for name in app warm; do
  "$bin" image convert --estargz --oci --plain-http "docker://$reg/demo/$name:plain" "$reg/demo/$name:estargz" | sed 's/^/   /'
done
"$bin" image inspect --plain-http "docker://$reg/demo/app:estargz" | sed 's/^/   /'
# The registry now moves behind the link, with the same storage.
kill -TERM "$REGISTRY_PID" 2>/dev/null || true
wait "$REGISTRY_PID" 2>/dev/null || true

profile=${LINK_PROFILE:-wan}
linkshape=$tgt/release/linkshape
if [[ -e /dev/net/tun ]] && command -v tc >/dev/null && command -v ip >/dev/null; then
  case $profile in
    lan) desc="linkshape lan: 1 ms round trip, 1 Gbit/s" ;;
    wan) desc="linkshape wan: 20 ms round trip, 100 Mbit/s" ;;
    slow) desc="linkshape slow: 100 ms round trip, 20 Mbit/s" ;;
    *) echo "demo: unknown LINK_PROFILE $profile" >&2; exit 2 ;;
  esac
  echo "== over a shaped link ($desc)"
  # The link's namespaces go when the command ends; the prefix keeps them apart from
  # anything else on the machine.
  prefix=sgzdemo$$
  LINK_DESC=$desc "$linkshape" --profile "$profile" --prefix "$prefix" -- \
    bash scripts/demo.sh --over-link "$work" "$tgt/release" "10.99.0.1:$port" "$work/registry/storage" "$prefix-srv"
else
  [[ ${CI:-} == true ]] && { echo "demo: no /dev/net/tun, tc or ip for the shaped link" >&2; exit 1; }
  echo "!!!!!!!! no /dev/net/tun, tc or ip: running on loopback, where lazy pulling has no latency to win back !!!!!!!!" >&2
  bash scripts/demo.sh --over-link "$work" "$tgt/release" "$reg" "$work/registry/storage"
fi
