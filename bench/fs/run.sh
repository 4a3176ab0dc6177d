#!/usr/bin/env bash
# The fs benchmark of docs/benchmarks/fs.md: cold reads over a shaped link vs curl,
# warm throughput and latency vs local disk, mount time and RSS of a 100k-file layer.
# Run as root from the workspace root. Needs /dev/fuse, ip, tc, docker-registry, curl.
#
#   SRC=/usr/lib/go-1.19   tree the test layer is built from
#   PROFILE=wan            linkshape profile (lan, wan, slow)
#   WORK=DIR KEEP=1        reuse and keep the built blobs (default: fresh temp dir, removed)
#   REF=0                  skip (d), the reference daemon (built by ../shared/reference/build.sh)
set -euo pipefail

SRC=${SRC:-/usr/lib/go-1.19}
PROFILE=${PROFILE:-wan}
case $PROFILE in
lan) RATE=1000 ;;
wan) RATE=100 ;;
slow) RATE=20 ;;
*) echo "unknown profile $PROFILE" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fsbench}
WORK=${WORK:-$(mktemp -d /var/tmp/fsbench.XXXXXX)}
mkdir -p "$WORK"
PREFIX=fsb

cleanup() {
	# FUSE mounts the benchmark left behind in this mount namespace (the ones made
	# inside `ip netns exec` vanish with its private mount namespace).
	awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
		while read -r m; do fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" || true; done
	ip netns del "$PREFIX-srv" 2>/dev/null || true
	ip netns del "$PREFIX-cli" 2>/dev/null || true
	if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

cargo build --release -p fs --example bench_fs -p linkshape --bin linkshape
BIN=$CARGO_TARGET_DIR/release

echo "== machine: $(nproc) vCPU, kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
start=$(date +%s)
"$BIN/examples/bench_fs" prepare "$WORK" "$SRC"
for _ in 1 2 3; do "$BIN/examples/bench_fs" mount100k "$WORK"; done
# The benchmark runs in the client namespace; it starts docker-registry in the server one.
"$BIN/linkshape" --profile "$PROFILE" --prefix "$PREFIX" -- \
	"$BIN/examples/bench_fs" net "$WORK" "$PREFIX-srv" 10.99.0.1 "$RATE"
if [ "${REF:-1}" = 1 ]; then
	# (d): the reference containerd-stargz-grpc behind a private containerd, same link,
	# same layer (pushed as an image, since it mounts layers of pulled images).
	REFD=$(../shared/reference/build.sh "$WORK/refbin" | tail -1)
	# Twice per reader count, each with a fresh registry, containerd and daemon root
	# (a cold cache).
	for readers in 8 1; do
		for _ in 1 2; do
			echo "== reference, $readers reader(s)"
			"$BIN/linkshape" --profile "$PROFILE" --prefix "$PREFIX" -- \
				bash bench/fs/ref-inner.sh "$WORK" "$BIN/examples/bench_fs" "$REFD" "$PREFIX-srv" 10.99.0.1 "$readers"
		done
	done
fi
echo "== total $(($(date +%s) - start)) s"
