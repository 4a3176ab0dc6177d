#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) each, starting from seeds made of
# small valid blobs and tars. Findings land in fuzz/artifacts/<target>/.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}; shift || true
targets=("$@"); ((${#targets[@]})) || targets=(open_blob read_blob build_tar toc_index registry_parsers)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
# cargo-fuzz needs unstable compiler flags; the stable toolchain allows them this way.
export RUSTC_BOOTSTRAP=1
seeds=fuzz/seeds
if [[ ! -d $seeds ]]; then
  cargo build --release -q -p cli --bin ctr-remote
  mkdir -p "$seeds/tars" "$seeds/blobs"
  python3 - "$seeds/tars" <<'PY'
import io, sys, tarfile
out = sys.argv[1]
def mk(name, fmt, entries):
    with tarfile.open(f"{out}/{name}.tar", "w", format=fmt) as tf:
        for n, kind, data in entries:
            t = tarfile.TarInfo(n); t.type = kind; t.mtime = 1700000000
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE: t.linkname = data.decode()
            if kind == tarfile.REGTYPE:
                t.size = len(data); tf.addfile(t, io.BytesIO(data))
            else:
                tf.addfile(t)
mk("small", tarfile.PAX_FORMAT, [("d/", tarfile.DIRTYPE, b""), ("d/f", tarfile.REGTYPE, b"hello" * 300), ("d/l", tarfile.SYMTYPE, b"f"), ("d/h", tarfile.LNKTYPE, b"d/f")])
mk("gnu", tarfile.GNU_FORMAT, [("x" * 120, tarfile.REGTYPE, b"long"), ("e", tarfile.REGTYPE, b"")])
mk("ustar", tarfile.USTAR_FORMAT, [("./a", tarfile.REGTYPE, bytes(range(256)) * 8)])
PY
  for t in "$seeds"/tars/*.tar; do
    b=$(basename "$t" .tar)
    target/release/ctr-remote blob build --chunk-size 1000 "$t" "$seeds/blobs/$b.gz.blob" >/dev/null
    target/release/ctr-remote blob build --zstdchunked --chunk-size 1000 "$t" "$seeds/blobs/$b.zstd.blob" >/dev/null
  done
fi
for t in "${targets[@]}"; do
  case $t in build_tar) seed=$seeds/tars ;; *) seed=$seeds/blobs ;; esac
  mkdir -p "fuzz/corpus/$t"
  echo "== fuzzing $t for ${secs}s"
  (cd fuzz && cargo fuzz run --release "$t" "corpus/$t" "../$seed" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1) 2>&1 | tail -15
done
