#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the format's compatibility tests
# against the reference's library, and the tests that start real registries, FUSE
# mounts and containerd. Run as root on Linux; see README.md. Ends with one line
# that totals every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export ESTARGZ_ORACLE=${ESTARGZ_ORACLE:-$PWD/target/oracle/estargz-oracle}
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
