#!/usr/bin/env bash
# Soak of docs/snapshotter.md (Cache lifecycle): N pull/run/remove cycles through a private
# containerd and our daemon with its FUSE manager. Each cycle pulls three small eStargz images
# (two pulled every cycle, one nobody pulled before, so an unbounded cache would grow), reads
# every file of each in a container and checks the bytes, then removes them all. After every
# cycle the FUSE manager's and the daemon's RSS and the cache directory's size are sampled.
# Prints the RSS slopes (KiB per cycle, least squares over the second half), the largest
# cache size and every sample. It is the test `soak_pull_run_remove` of
# crates/stargzd/tests/lifecycle.rs run for longer (CI runs 30 cycles).
# Run as root from the workspace root. Needs containerd, runc, docker-registry, ctr-remote,
# busybox-static and fuse3 (scripts/deps.sh installs them).
#
#   N=200          cycles
#   MEMORY_MIB=4   [directory_cache] max_memory_bytes of the run, in MiB: the memory LRU fills
#                  up to it with every new image's chunks (64 MiB by default), which would
#                  hide a real climb for as many cycles as it takes to fill
#   PROFILE=dev    cargo profile of the daemon and the test (release: figures of a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
MEMORY_MIB=${MEMORY_MIB:-4}
PROFILE=${PROFILE:-dev}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
for t in /usr/bin/containerd /usr/bin/ctr-remote /usr/bin/docker-registry /usr/sbin/runc /bin/busybox; do
	[ -x "$t" ] || { echo "missing $t (scripts/deps.sh installs it)" >&2; exit 2; }
done
flags=()
[ "$PROFILE" = dev ] || flags=(--profile "$PROFILE")
out=$(mktemp /var/tmp/soak.XXXXXX)
trap 'rm -f "$out"' EXIT
echo "== $N cycles, memory LRU $MEMORY_MIB MiB, $PROFILE build; load: $(uptime)"
status=0
SOAK_CYCLES=$N SOAK_MEMORY_MIB=$MEMORY_MIB CI=true \
	cargo test -q "${flags[@]}" -p stargzd --test lifecycle soak_pull_run_remove -- \
	--nocapture --test-threads 1 >"$out" 2>&1 || status=$?
grep -E '^soak' "$out" || { tail -50 "$out"; exit 1; }
echo "cycle manager_rss_kib daemon_rss_kib cache_bytes"
grep -E '^[0-9]+ [0-9.]+ [0-9.]+ [0-9.]+$' "$out"
[ "$status" = 0 ] || { grep -E 'panicked|FUSE manager RSS climbs|cache directory reached' "$out"; exit "$status"; }
