#!/usr/bin/env bash
# HelloBench-style start-up benchmark, reproducible on a fresh Debian machine (root):
# installs what it needs, builds our release binaries and the reference daemon, builds
# the image corpus offline (cached in /var/cache/hellobench), and runs every mode
# through one containerd over a shaped link. Results go to docs/benchmarks/hellobench/.
#
#   bench/hellobench.sh [--profile lan|wan|slow] [--samples N] [--images a,b] [--modes x,y] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q -p cli -p stargzd -p hellobench
tgt=${CARGO_TARGET_DIR:-target}
ref_args=()
shared=${STARGZ_SHARED_DIR:-$(cd .. && pwd)/shared}
if ref=$(bash "$shared/reference/build.sh" "$tgt/reference" 2>/dev/null | tail -n 1) && [[ -x $ref ]]; then
  ref_args=(--ref-daemon "$ref")
else
  echo "hellobench.sh: the reference daemon could not be built; its modes are skipped" >&2
fi
exec "$tgt/release/hellobench" run --bin-dir "$tgt/release" "${ref_args[@]}" "$@"
