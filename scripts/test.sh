#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the format's compatibility tests
# against the reference's library, and the tests that start real registries, FUSE
# mounts and containerd. Run as root on Linux; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export ESTARGZ_ORACLE=${ESTARGZ_ORACLE:-$PWD/target/oracle/estargz-oracle}
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
