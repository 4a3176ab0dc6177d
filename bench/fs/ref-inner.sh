#!/usr/bin/env bash
# Part (d) of the fs benchmark, run by run.sh inside the client namespace of the shaped
# link (via `ip netns exec`, so every process below shares one private mount namespace
# and the reference's FUSE mounts are visible to the readers).
# usage: ref-inner.sh WORK BENCH_FS REF_DAEMON SERVER_NS SERVER_ADDR READERS
set -euo pipefail
WORK=$1 BENCH=$2 REFD=$3 NS=$4 ADDR=$5 READERS=${6:-8}
D=$WORK/ref
. "$(dirname "$0")/../../scripts/registry.sh"
HOST=$ADDR:5000
rm -rf "$D" && mkdir -p "$D/reg" "$D/containerd" "$D/state" "$D/ref"
pids=()
cleanup() {
	# Stop the reference with SIGTERM (SIGINT in v0.12.0 deletes its snapshots badly).
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	awk -v w="$D" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
		while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT

start_registry "$D/reg" "$HOST" "$NS"
pids+=("$REGISTRY_PID")
for _ in $(seq 100); do (exec 3<>"/dev/tcp/$ADDR/5000") 2>/dev/null && break; sleep 0.1; done
"$BENCH" push-image "$WORK" "$HOST" layer
"$BENCH" push-image "$WORK" "$HOST" small

cat >"$D/ref/config.toml" <<CFG
metadata_store = "memory"
[[resolver.host."$HOST".mirrors]]
host = "$HOST"
insecure = true
CFG
"$REFD" --address "$D/ref/ref.sock" --root "$D/ref/root" --config "$D/ref/config.toml" \
	--log-level warn 2>"$D/ref/log" &
pids+=($!)
refpid=$!

cat >"$D/containerd/config.toml" <<CFG
version = 2
root = "$D/containerd/root"
state = "$D/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
address = "$D/containerd/containerd.sock"
[proxy_plugins.stargz]
type = "snapshot"
address = "$D/ref/ref.sock"
CFG
containerd --config "$D/containerd/config.toml" 2>"$D/containerd/log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$D/containerd/containerd.sock" ] && [ -S "$D/ref/ref.sock" ] && break; sleep 0.1; done

rss() { awk '/^VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$refpid/status"; }
rpull() {
	local start end
	start=$(date +%s.%N)
	ctr-remote -a "$D/containerd/containerd.sock" image rpull --plain-http --snapshotter stargz \
		"$HOST/bench/$1:v1" >/dev/null
	end=$(date +%s.%N)
	awk -v a="$start" -v b="$end" -v n="$1" \
		'BEGIN {printf "reference rpull of %s (manifest, config, TOC, mount): %.2f s\n", n, b - a}'
}
# The newest FUSE mount under the reference's root.
newest_mount() { awk -v w="$D/ref/root" '$3 ~ /^fuse/ && index($2, w) == 1 {print $2}' /proc/mounts | tail -1; }

rpull layer
mnt=$(newest_mount)
[ -n "$mnt" ] || { echo "no reference FUSE mount found"; tail -5 "$D/ref/log"; exit 1; }
echo "reference mount: $mnt"
"$BENCH" read "$mnt" "$READERS"
# Let background fetch finish, then the warm figures on the same mount.
for _ in $(seq 120); do
	f=$(cat "$mnt/.stargz-snapshotter/"*.json 2>/dev/null | sed -n 's/.*"fetchedPercent":\([0-9.]*\).*/\1/p')
	[ "${f%.*}" = 100 ] && break
	sleep 1
done
echo "reference fetched: $f %"
"$BENCH" warm "$mnt"
# A fresh mount's page cache, the daemon's cache warm: drop every clean page, then read
# the reference's cache files (its own filesystem, not the FUSE mounts) back in.
fresh_pages() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
	find "$D/ref/root" -xdev -type f -exec cat {} + >/dev/null
}
for _ in 1 2; do
	fresh_pages
	"$BENCH" first-read "$mnt"
	fresh_pages
	"$BENCH" first-touch "$mnt"
done
echo "reference daemon RSS before the 100k-file layer: $(rss)"
rpull small
echo "reference daemon RSS after mounting it: $(rss)"
