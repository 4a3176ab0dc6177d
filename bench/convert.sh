#!/usr/bin/env bash
# Conversion benchmark: builds the same tar (a few hundred MB of real files) with our
# builder and with the reference's (the checker's `build`, GOMAXPROCS=2), at the same
# level and chunk size, in one run; prints throughput, output size and the ratio, and
# our single-thread chunk decompress+verify throughput.
#
#   bench/convert.sh [RUNS]          (default 3 runs each; the median is reported)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
bash scripts/deps.sh
cargo build --release -q -p cli --bin ctr-remote
cargo build --release -q -p estargz --example decode_throughput
ours=target/release/ctr-remote
oracle=target/oracle/estargz-oracle
work=$(mktemp -d /var/tmp/stargz-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Real files: the Go toolchain tree (sources, binaries, test data) when present.
src=usr/lib/go-1.19
[[ -d /$src ]] || src=usr/lib/x86_64-linux-gnu
tar -cf "$work/input.tar" -C / "$src"
in_bytes=$(stat -c %s "$work/input.tar")
cat "$work/input.tar" > /dev/null  # warm the page cache for both

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_runs() { # name cmd... -> prints median wall seconds; keeps the last output
  local name=$1; shift
  for _ in $(seq "$runs"); do
    local s e
    s=$(date +%s%N); "$@" > /dev/null; e=$(date +%s%N)
    echo "scale=3; ($e - $s) / 1000000000" | awk -v ns=$((e - s)) 'BEGIN {printf "%.3f\n", ns / 1e9}'
  done | median
}

ours_s=$(time_runs ours "$ours" blob build --level 9 --chunk-size 4194304 "$work/input.tar" "$work/ours.blob")
ref_s=$(time_runs reference "$oracle" build --procs 2 --level 9 --chunk-size 4194304 "$work/input.tar" "$work/ref.blob")
ours_b=$(stat -c %s "$work/ours.blob")
ref_b=$(stat -c %s "$work/ref.blob")
decode=$(target/release/examples/decode_throughput "$work/ours.blob")

python3 - "$in_bytes" "$ours_s" "$ref_s" "$ours_b" "$ref_b" "$src" "$runs" "$decode" <<'PY'
import json, sys
inb, os_, rs, ob, rb, src, runs, dec = sys.argv[1:]
inb, os_, rs, ob, rb = int(inb), float(os_), float(rs), int(ob), int(rb)
dec = json.loads(dec)
mb = inb / 1e6
print(f"input: /{src} as a tar, {mb:.1f} MB; gzip level 9, 4 MiB chunks; median of {runs} runs")
print()
print("| builder | wall (s) | throughput (MB/s of input) | output (bytes) |")
print("|---|---:|---:|---:|")
print(f"| stargz-rs (all cores) | {os_:.2f} | {mb/os_:.1f} | {ob} |")
print(f"| reference (estargz.Build, GOMAXPROCS=2) | {rs:.2f} | {mb/rs:.1f} | {rb} |")
print()
print(f"speed-up: {rs/os_:.2f}x; output size vs reference: {100*(ob/rb-1):+.2f}%")
print(f"single-thread chunk decompress+verify: {dec['mbPerSec']:.0f} MB/s ({dec['chunks']} chunks, {dec['bytes']/1e6:.1f} MB)")
PY
