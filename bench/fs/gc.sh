#!/usr/bin/env bash
# Cost of the chunk cache's garbage collection (docs/snapshotter.md, Cache lifecycle), with
# crates/fs/examples/gc_pass.rs: fills a directory with SIZE_GIB of cache files laid out as
# chunk files (ascending mtimes), opens it as a cache (temp-file sweep and index), times 4 KiB
# reads of a cached chunk on the FUSE fast path against that full index and against an empty
# one, then bounds the cache to a tenth of its bytes: one pass evicts nine tenths of the files,
# least recently used first. One JSON line per file size.
#
#   SIZE_GIB=10          bytes in the cache
#   FILE_KIB="4096 64"   file sizes, one run each (10 GiB: 2,560 and 163,840 files)
#   REAL=0               1 = files with real data blocks (needs SIZE_GIB free), else sparse
#   DIR=/var/tmp         where the cache directory is made (removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_GIB=${SIZE_GIB:-10}
FILE_KIB=${FILE_KIB:-4096 64}
REAL=${REAL:-0}
DIR=${DIR:-/var/tmp}
cargo build --release -q -p fs --example gc_pass
BIN=${CARGO_TARGET_DIR:-target}/release/examples/gc_pass
mode=()
[ "$REAL" = 1 ] && mode=(real)
echo "== $SIZE_GIB GiB, $([ "$REAL" = 1 ] && echo real || echo sparse) files in $DIR ($(df -T "$DIR" | awk 'NR==2 {print $2}')); load: $(uptime)"
for kib in $FILE_KIB; do
	work=$(mktemp -d "$DIR/gc.XXXXXX")
	"$BIN" "$work/cache" $((SIZE_GIB * 1024)) "$kib" "${mode[@]}" || { rm -rf "$work"; exit 1; }
	rm -rf "$work"
done
