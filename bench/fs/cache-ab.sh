#!/usr/bin/env bash
# A/B of the fs benchmark's warm and cold rows between two builds of `bench_fs`
# (docs/benchmarks/fs.md, "Cost of the cache bookkeeping"): both run the rows the chunk
# cache can move (`BENCH_FS_ROWS=cache`) over the same shaped link and the same blobs,
# in alternating turns (A, B, A, B, ...) so a loaded machine weighs on both alike.
# Run as root from the workspace root. Needs /dev/fuse, ip, tc, docker-registry, curl.
#
#   A=DIR B=DIR       directories holding examples/bench_fs of each build (release)
#   LINKSHAPE=BIN     the linkshape binary (default: B's)
#   ROUNDS=3          turns of each build
#   PROFILE=wan       linkshape profile (lan, wan, slow)
#   SRC=/usr/lib/go-1.19   tree the test layer is built from
#   WORK=DIR KEEP=1   reuse and keep the built blobs
set -euo pipefail

: "${A:?A=dir of the first build}" "${B:?B=dir of the second build}"
LINKSHAPE=${LINKSHAPE:-$B/linkshape}
ROUNDS=${ROUNDS:-3}
SRC=${SRC:-/usr/lib/go-1.19}
PROFILE=${PROFILE:-wan}
case $PROFILE in
lan) RATE=1000 ;;
wan) RATE=100 ;;
slow) RATE=20 ;;
*) echo "unknown profile $PROFILE" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
WORK=${WORK:-$(mktemp -d /var/tmp/fscacheab.XXXXXX)}
mkdir -p "$WORK"
PREFIX=fsc

cleanup() {
	awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
		while read -r m; do fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" || true; done
	ip netns del "$PREFIX-srv" 2>/dev/null || true
	ip netns del "$PREFIX-cli" 2>/dev/null || true
	if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== machine: $(nproc) vCPU, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
[ -e "$WORK/layer.json" ] || "$B/examples/bench_fs" prepare "$WORK" "$SRC"
for r in $(seq 1 "$ROUNDS"); do
	for side in A B; do
		dir=${!side}
		echo "== round $r, $side ($dir), load $(cut -d' ' -f1-3 /proc/loadavg)"
		BENCH_FS_ROWS=cache "$LINKSHAPE" --profile "$PROFILE" --prefix "$PREFIX" -- \
			"$dir/examples/bench_fs" net "$WORK" "$PREFIX-srv" 10.99.0.1 "$RATE"
	done
done
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
