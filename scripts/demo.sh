#!/usr/bin/env bash
# The main job: builds ctr-remote, makes a sample layer tar, converts it to eStargz with
# prioritized files, verifies it with our verifier and (when available) with the
# reference's library, and prints its TOC digest and the layer annotations.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -p cli
bin=target/release/ctr-remote
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 crates/cli/tests/fixtures/mktars.py "$work" >/dev/null
tar=$work/pax-prio.tar
echo "== sample layer: $(du -h "$tar" | cut -f1) tar, prioritized files:"
sed 's/^/   /' "$work/pax-prio.prio"

echo "== converting to eStargz"
start=$(date +%s%N)
"$bin" blob build --prioritized-files "$work/pax-prio.prio" --json "$tar" "$work/layer.estargz" > "$work/build.json"
end=$(date +%s%N)
cat "$work/build.json"
toc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tocDigest"])' "$work/build.json")
echo "== converted in $(( (end - start) / 1000000 )) ms"

echo "== verifying (every chunk, every file, against the original tar)"
"$bin" blob verify --toc-digest "$toc" --tar "$tar" "$work/layer.estargz"

oracle=target/oracle/estargz-oracle
if [[ -x $oracle ]]; then
  echo "== verifying with the reference implementation's library"
  "$oracle" verify --toc-digest "$toc" "$work/layer.estargz" "$tar" | python3 -c 'import json,sys; v=json.load(sys.stdin); print("reference verify:", "OK" if v["ok"] else v)'
fi
echo "TOC digest: $toc"
