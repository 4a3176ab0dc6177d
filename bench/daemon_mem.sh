#!/usr/bin/env bash
# Daemon memory benchmark of docs/benchmarks/daemon.md: RSS of our containerd-stargz-grpc
# and of the reference daemon (v0.12, built by ../shared/reference/build.sh) with N eStargz
# layers mounted, through one private containerd that has both as proxy plugins (`stargz`
# and `stargz-ref`), each image pulled with Debian's `ctr-remote image rpull`.
# Run as root from the workspace root. Needs containerd, docker-registry, ctr-remote, curl.
#
#   N=20                 images (one layer each, all different)
#   SRC=/usr/share/perl  tree each layer is built from (plus a file unique to the image)
#   SETTLE=30            seconds to wait after the pulls (background fetch) before the last sample
#   CONFIG='no_background_fetch = true'   extra TOML lines given to both daemons
#   OURS_ENV='MALLOC_ARENA_MAX=2'         environment for our daemon only (diagnosis)
#   BIN=DIR              use DIR's containerd-stargz-grpc and ctr-remote instead of building them
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20}
SRC=${SRC:-/usr/share/perl}
SETTLE=${SETTLE:-30}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
for t in /usr/bin/containerd /usr/bin/ctr-remote /usr/bin/docker-registry curl python3; do
	command -v "$t" >/dev/null || { echo "missing $t (scripts/deps.sh installs it)" >&2; exit 2; }
done
if [ -z "${BIN:-}" ]; then
	export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
	cargo build --release -q -p stargzd -p cli
	BIN=$CARGO_TARGET_DIR/release
fi
WORK=$(mktemp -d /var/tmp/daemon-mem.XXXXXX)
PIDS=()

cleanup() {
	# Ours: SIGINT unmounts and stops its FUSE manager too.
	[[ -n ${OURS:-} ]] && kill -INT "$OURS" 2>/dev/null || true
	for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do
		for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$p" 2>/dev/null || true
	done
	awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
		while read -r m; do umount -l "$m" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

REFD=$(../shared/reference/build.sh "$WORK/refbin" | tail -1)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REG=127.0.0.1:$port

wait_path() { for _ in $(seq 300); do [ -e "$1" ] && return 0; sleep 0.1; done; echo "$1 did not appear" >&2; exit 1; }

# --- registry
mkdir -p "$WORK/registry"
cat >"$WORK/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/registry/storage
http:
  addr: $REG
EOF
docker-registry serve "$WORK/registry/config.yml" >"$WORK/registry/log" 2>&1 &
PIDS+=($!)
for _ in $(seq 150); do curl -fs "http://$REG/v2/" >/dev/null && break; sleep 0.1; done

push_blob() { # repo file -> digest
	local digest loc
	digest=sha256:$(sha256sum "$2" | cut -d' ' -f1)
	loc=$(curl -fsS -X POST -D - -o /dev/null "http://$REG/v2/$1/blobs/uploads/" |
		awk 'tolower($1) == "location:" {print $2}' | tr -d '\r')
	case $loc in http*) ;; *) loc=http://$REG$loc ;; esac
	case $loc in *\?*) loc="$loc&digest=$digest" ;; *) loc="$loc?digest=$digest" ;; esac
	curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$2" "$loc" >/dev/null
	echo "$digest"
}

# --- N single-layer eStargz images, built offline with our builder
echo "== building and pushing $N images of $SRC"
for i in $(seq "$N"); do
	d=$WORK/img$i
	mkdir -p "$d/uniq"
	echo "image $i" >"$d/uniq/image-id"
	tar -cf "$d/layer.tar" -C / "${SRC#/}" -C "$d/uniq" image-id
	"$BIN/ctr-remote" blob build --json --level 6 "$d/layer.tar" "$d/layer.blob" >"$d/build.json"
	push_blob "bench/img$i" "$d/layer.blob" >/dev/null
	python3 - "$d" >"$d/config.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1] + "/build.json"))
print(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                  "rootfs": {"type": "layers", "diff_ids": [b["diffID"]]}}))
PY
	cd_digest=$(push_blob "bench/img$i" "$d/config.json")
	python3 - "$d" "$cd_digest" >"$d/manifest.json" <<'PY'
import json, os, sys
d, cfg = sys.argv[1:]
b = json.load(open(d + "/build.json"))
print(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg,
               "size": os.path.getsize(d + "/config.json")},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": b["blobDigest"],
                "size": b["blobSize"], "annotations": b["annotations"]}]}))
PY
	curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
		--data-binary "@$d/manifest.json" "http://$REG/v2/bench/img$i/manifests/v1" >/dev/null
	rm -f "$d/layer.tar"
done
python3 - "$WORK/img1/build.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
print(f"   each layer: {b['entries']} entries, {b['blobSize']} bytes compressed, {b['uncompressedSize']} uncompressed")
PY

# --- the two daemons, default configuration each (the reference needs a memory metadata store)
mkdir -p "$WORK/ours" "$WORK/ref"
printf '%s\n' "${CONFIG:-}" >"$WORK/ours.toml"
printf 'metadata_store = "memory"\n%s\n' "${CONFIG:-}" >"$WORK/ref.toml"
env ${OURS_ENV:-} "$BIN/containerd-stargz-grpc" --address "$WORK/ours.sock" --root "$WORK/ours" \
	--config "$WORK/ours.toml" --log-level warn 2>"$WORK/ours.log" &
OURS=$!
PIDS+=($OURS)
"$REFD" --address "$WORK/ref.sock" --root "$WORK/ref" --config "$WORK/ref.toml" \
	--log-level warn 2>"$WORK/ref.log" &
REF=$!
PIDS+=($REF)
wait_path "$WORK/ours.sock"
wait_path "$WORK/ref.sock"

cat >"$WORK/containerd.toml" <<EOF
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$WORK/containerd.sock"
[ttrpc]
  address = "$WORK/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$WORK/containerd/opt"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "$WORK/ours.sock"
[proxy_plugins.stargz-ref]
  type = "snapshot"
  address = "$WORK/ref.sock"
EOF
containerd --config "$WORK/containerd.toml" >"$WORK/containerd.log" 2>&1 &
PIDS+=($!)
wait_path "$WORK/containerd.sock"

rss() { # pids -> "rss_kib pss_kib", summed
	local r=0 p=0 pid
	for pid in "$@"; do
		r=$((r + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")))
		p=$((p + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")))
	done
	echo "$r $p"
}
# Our layers live in the FUSE manager process (when enabled): count it with the daemon.
ours_pids() { echo "$OURS" $(cat "$WORK/ours/fuse-manager.pid" 2>/dev/null); }
fuse_mounts() { awk -v w="$1" 'index($2, w) == 1 && $3 ~ /^fuse/' /proc/mounts | wc -l; }

declare -A S
S[ours_idle]=$(rss $(ours_pids))
S[ref_idle]=$(rss $REF)
pull_all() { # snapshotter namespace -> seconds
	local s e
	s=$(date +%s%N)
	for i in $(seq "$N"); do
		ctr-remote -a "$WORK/containerd.sock" -n "$2" image rpull --plain-http --snapshotter "$1" \
			"$REG/bench/img$i:v1" >/dev/null
	done
	e=$(date +%s%N)
	awk -v ns=$((e - s)) 'BEGIN {printf "%.1f", ns / 1e9}'
}
echo "== pulling $N images into each daemon"
t_ours=$(pull_all stargz ours)
S[ours_pulled]=$(rss $(ours_pids))
t_ref=$(pull_all stargz-ref ref)
S[ref_pulled]=$(rss $REF)
m_ours=$(fuse_mounts "$WORK/ours")
m_ref=$(fuse_mounts "$WORK/ref")
sleep "$SETTLE"
S[ours_settled]=$(rss $(ours_pids))
S[ref_settled]=$(rss $REF)

echo "== config: ${CONFIG:-defaults}; our env: ${OURS_ENV:-none}; load: $(uptime)"
python3 - "$N" "$m_ours" "$m_ref" "$t_ours" "$t_ref" "$SETTLE" \
	"${S[ours_idle]}" "${S[ref_idle]}" "${S[ours_pulled]}" "${S[ref_pulled]}" \
	"${S[ours_settled]}" "${S[ref_settled]}" <<'PY'
import sys
a = sys.argv[1:]
n, mo, mr, to, tr, settle = a[:6]
v = [int(x) for x in " ".join(a[6:]).split()]
oi, ri, op, rp, os_, rs = [(v[i], v[i + 1]) for i in range(0, 12, 2)]
mib = lambda k: f"{k / 1024:.1f}"
print(f"\n{n} images pulled per daemon; FUSE mounts: ours {mo}, reference {mr}; "
      f"pull time: ours {to} s, reference {tr} s\n")
print("| daemon | idle RSS (MiB) | RSS after pulls (MiB) | RSS after +%ss (MiB) | PSS after +%ss (MiB) |" % (settle, settle))
print("|---|---:|---:|---:|---:|")
print(f"| stargz-rs | {mib(oi[0])} | {mib(op[0])} | {mib(os_[0])} | {mib(os_[1])} |")
print(f"| reference v0.12 | {mib(ri[0])} | {mib(rp[0])} | {mib(rs[0])} | {mib(rs[1])} |")
print(f"\nRSS ratio after settling (ours / reference): {os_[0] / rs[0]:.2f}")
PY
