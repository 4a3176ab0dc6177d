#!/usr/bin/env bash
# Warm metadata speed of a lazily mounted layer under overlayfs (as containerd stacks
# it) against the same tree extracted on overlayfs, with the reference's 1 s FUSE
# timeouts and with ours, side by side in one hyperfine run. See
# docs/benchmarks/fs.md, "Metadata". Run as root from the workspace root; needs
# /dev/fuse and hyperfine (apt-get install -y hyperfine).
#
#   RUNS=20        runs per command (hyperfine, after 3 warm-up runs; and alternating rounds)
#   SPACED=1       pause 1.2 s before every run (0: back to back)
#   WORK=DIR       where the tree, blob and mounts go (default: fresh temp dir, removed)
set -euo pipefail

RUNS=${RUNS:-20}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install -y hyperfine)" >&2; exit 2; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fsbench}
WORK=${WORK:-$(mktemp -d /var/tmp/metabench.XXXXXX)}
mkdir -p "$WORK"
PIDS=()

cleanup() {
	touch "$WORK/stop-ref1s" "$WORK/stop-ours" 2>/dev/null || true
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
# Each run follows a pause longer than the reference's 1 s timeouts, as the next
# container start on a node would; SPACED=0 runs them back to back.
prep=()
[ "${SPACED:-1}" = 1 ] && prep=(--prepare "sleep 1.2")
hyperfine --warmup 3 --runs "$RUNS" "${prep[@]}" --export-markdown "$WORK/result.md" --export-json "$WORK/result.json" "${args[@]}"
echo "== hyperfine (consecutive runs of each command): median, mean, min ms"
python3 - "$WORK/result.json" <<'PY'
import json, statistics, sys
for r in json.load(open(sys.argv[1]))["results"]:
    t = [x * 1000 for x in r["times"]]
    print(f"{r['command']:<24} {statistics.median(t):8.1f} {statistics.mean(t):8.1f} {min(t):8.1f}")
PY
# On a shared machine the load drifts between commands; the same commands taking
# turns, round after round, compare them under the same load.
echo "== alternating rounds ($RUNS): median (p25-p75) ms, and ours/ref1s relative to overlayfs"
python3 - "$RUNS" "${SPACED:-1}" "${cmds[@]}" <<'PY'
import statistics, subprocess, sys, time
runs, spaced, cmds = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
times = [[] for _ in cmds]
for _ in range(runs + 2):
    for i, c in enumerate(cmds):
        if spaced:
            time.sleep(1.2)
        t = time.perf_counter()
        subprocess.run(c, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times[i].append((time.perf_counter() - t) * 1000)
names = ["find", "stat all", "stat missing"]
med = []
for i, c in enumerate(cmds):
    t = sorted(times[i][2:])
    q = statistics.quantiles(t, n=4)
    med.append(statistics.median(t))
    print(f"{names[i % 3]:<13} {['overlayfs', 'ref1s', 'ours'][i // 3]:<10} {med[-1]:8.1f} ({q[0]:.1f}-{q[2]:.1f})")
for k in range(3):
    print(f"{names[k]:<13} overlayfs/ref1s {med[k] / med[3 + k]:.2f}x  overlayfs/ours {med[k] / med[6 + k]:.2f}x")
PY
