#!/usr/bin/env bash
# Start-up benchmark of docs/benchmarks/fs.md, "Start-up": how long until every layer of
# an optimized image (one layer, then four) is open and its prioritized files are local, over a
# shaped link, the way it was done (a HEAD per blob, prefetch after the TOC) against
# no HEAD and a speculative head fetched alongside the TOC, taking turns in one run.
# Run as root from the workspace root. Needs /dev/net/tun, ip, tc, docker-registry.
#
#   PROFILE=wan    linkshape profile (lan, wan, slow)
#   ROUNDS=7       measured rounds of each way
#   WORK=DIR       where the blobs go (default: fresh temp dir, removed)
#   SPLIT=1        instead: one prefetch request against K = 2, 4 parallel ranged ones
#                  for prefetch ranges of SPLIT_MIB (default 4 16 64) MiB after an open's
#                  reads, then (COLD_MIB, default 4 16) on no connection
set -euo pipefail

PROFILE=${PROFILE:-wan}
ROUNDS=${ROUNDS:-7}
case $PROFILE in
lan) RATE=1000 RTT=1 ;;
wan) RATE=100 RTT=20 ;;
slow) RATE=20 RTT=100 ;;
*) echo "unknown profile $PROFILE" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fsbench}
WORK=${WORK:-$(mktemp -d /var/tmp/startbench.XXXXXX)}
mkdir -p "$WORK"
PREFIX=fsu

cleanup() {
	ip netns del "$PREFIX-srv" 2>/dev/null || true
	ip netns del "$PREFIX-cli" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release -p fs --example bench_startup -p linkshape --bin linkshape
BIN=$CARGO_TARGET_DIR/release

echo "== machine: $(nproc) vCPU, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "${SPLIT:-0}" = 1 ]; then
	# shellcheck disable=SC2086 # the size lists are meant to split into arguments
	for cold in 0 1; do
		if [ $cold = 1 ]; then sizes=${COLD_MIB:-4 16}; else sizes=${SPLIT_MIB:-4 16 64}; fi
		SPLIT_COLD=$cold "$BIN/linkshape" --profile "$PROFILE" --prefix "$PREFIX" -- \
			"$BIN/examples/bench_startup" split "$PREFIX-srv" 10.99.0.1 "$RATE" "$RTT" "$ROUNDS" $sizes
	done
	echo "== load $(cut -d' ' -f1-3 /proc/loadavg)"
	exit 0
fi
"$BIN/examples/bench_startup" prepare "$WORK"
"$BIN/linkshape" --profile "$PROFILE" --prefix "$PREFIX" -- \
	"$BIN/examples/bench_startup" run "$WORK" "$PREFIX-srv" 10.99.0.1 "$RATE" "$RTT" "$ROUNDS" ${IMAGES:-1 2 4}
