#!/usr/bin/env bash
# Warm metadata speed of a lazily mounted layer under overlayfs (as containerd stacks
# it) against the same tree extracted on overlayfs, with the reference's 1 s FUSE
# timeouts and with ours, side by side in one hyperfine run. See
# docs/benchmarks/fs.md, "Metadata". Run as root from the workspace root; needs
# /dev/fuse and hyperfine (apt-get install -y hyperfine).
#
#   RUNS=30        hyperfine runs per command (after 3 warm-up runs)
#   WORK=DIR       where the tree, blob and mounts go (default: fresh temp dir, removed)
set -euo pipefail

RUNS=${RUNS:-30}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install -y hyperfine)" >&2; exit 2; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fsbench}
WORK=${WORK:-$(mktemp -d /var/tmp/metabench.XXXXXX)}
mkdir -p "$WORK"
PIDS=()

cleanup() {
	touch "$WORK"/stop-* 2>/dev/null || true
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
		while read -r m; do umount -l "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release -p fs --example bench_meta
BIN=$CARGO_TARGET_DIR/release/examples/bench_meta

echo "== machine: $(nproc) vCPU, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN" prepare "$WORK"

# overlay NAME LOWER: an overlayfs at $WORK/NAME/merged with an empty upper layer.
overlay() {
	mkdir -p "$WORK/$1/upper" "$WORK/$1/work" "$WORK/$1/merged"
	mount -t overlay overlay -o "lowerdir=$2,upperdir=$WORK/$1/upper,workdir=$WORK/$1/work" "$WORK/$1/merged"
}

# serve NAME ATTR ENTRY: our FUSE layer with those timeouts, then overlayfs over it.
serve() {
	mkdir -p "$WORK/$1/layer"
	"$BIN" serve "$WORK" "$WORK/$1/layer" "$2" "$3" "$WORK/stop-$1" >"$WORK/$1.out" &
	PIDS+=($!)
	for _ in $(seq 600); do grep -q ready "$WORK/$1.out" 2>/dev/null && break; sleep 0.1; done
	grep -q ready "$WORK/$1.out" || { echo "mount $1 did not come up" >&2; exit 1; }
	overlay "$1" "$WORK/$1/layer"
}

mkdir -p "$WORK/tree"
tar -xf "$WORK/tree.tar" -C "$WORK/tree"
overlay overlayfs "$WORK/tree"
serve ref1s 1 1
serve ours 86400 86400

# Every path of the tree, and three names per directory that are not there (what an
# interpreter's module search stats), relative to a mount's root.
(cd "$WORK/tree" && find . -xdev) >"$WORK/paths"
(cd "$WORK/tree" && find . -xdev -type d) | awk '{print $0 "/__init__.py"; print $0 "/missing.so"; print $0 "/x.pyc"}' >"$WORK/missing"
echo "== $(wc -l <"$WORK/paths") paths, $(wc -l <"$WORK/missing") missing names"

cmds=()
names=()
for m in overlayfs ref1s ours; do
	d=$WORK/$m/merged
	names+=("find, $m" "stat all, $m" "stat missing, $m")
	cmds+=("find $d -xdev"
		"sh -c 'cd $d && xargs -a $WORK/paths stat --printf=.'"
		"sh -c 'cd $d && xargs -a $WORK/missing stat --printf=. 2>/dev/null; true'")
done
args=()
for i in "${!cmds[@]}"; do args+=(-n "${names[$i]}" "${cmds[$i]}"); done
hyperfine --warmup 3 --runs "$RUNS" --export-markdown "$WORK/result.md" "${args[@]}"
echo "== table"
cat "$WORK/result.md"
