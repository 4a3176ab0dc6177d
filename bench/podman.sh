#!/usr/bin/env bash
# HelloBench-style start-up with Podman: `podman pull` + `podman run` until the
# workload's line, ordinary vs through stargz-store, over a shaped link, every mode in
# the same run (root, Debian 12).
#
#   bench/podman.sh [--profile lan|wan|slow] [--samples N] [--images python,node]
#                   [--modes ordinary,stargz-store,stargz-store-zstd]
#
# Images come from the HelloBench corpus (`hellobench corpus`, built offline from the
# Debian archive and cached in /var/cache/hellobench). They are loaded into a loopback
# docker-registry: the layout as built (`ordinary`), and converted with our
# `ctr-remote image convert --estargz --oci` (`stargz-store`) or `--zstdchunked`. Then
# the registry's storage moves behind a `linkshape` link (registry in the server
# network namespace; Podman and the store in the client one, network namespace only,
# so mounts stay shared). Every sample starts from nothing: a new Podman storage and,
# for the lazy modes, a new store (empty cache) with its default configuration
# (prefetch and background fetch on). Recorded per sample: pull seconds, run seconds
# (`podman run` until the line), bytes the registry sent over the link from the pull
# until the line (background fetch included). Results:
# docs/benchmarks/podman/PROFILE.jsonl, PROFILE.md and PROFILE.svg.
#
# STARGZ_BIN_DIR=dir uses binaries built already (ctr-remote, stargz-store,
# hellobench, linkshape) instead of a release build; BIN_NOTE says how, in the report.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/registry.sh
[[ $(id -u) == 0 ]] || { echo "bench/podman.sh: run as root" >&2; exit 1; }
profile=wan samples=3 images=python,node modes=ordinary,stargz-store
while (($#)); do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --samples) samples=$2; shift 2 ;;
    --images) images=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    *) echo "bench/podman.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bash scripts/deps.sh
if [[ -n ${STARGZ_BIN_DIR:-} ]]; then
  bin=$(cd "$STARGZ_BIN_DIR" && pwd)
else
  cargo build --release -q -p cli -p stargz-store -p hellobench -p linkshape
  bin=$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)
fi
out=docs/benchmarks/podman
mkdir -p "$out"
work=$(mktemp -d /var/tmp/podman-bench.XXXXXX)
ns=pmb$$
srv=10.99.0.1:5000
pids=()
link_pid=
store_pid=

unmount_under() {
  awk -v p="$1" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
stop_pid() { # signal pid
  kill -s "$1" "$2" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$2" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$2" 2>/dev/null || true
}
stop_store() {
  [[ -n $store_pid ]] && stop_pid INT "$store_pid"
  store_pid=
}
cleanup() {
  stop_store
  for p in "${pids[@]}"; do stop_pid TERM "$p"; done
  # Closing the link's stdin takes it down and deletes both namespaces.
  exec 7>&- 2>/dev/null || true
  [[ -n $link_pid ]] && { wait "$link_pid" 2>/dev/null || true; }
  unmount_under "$work"
  rm -rf "$work"
}
trap cleanup EXIT

# --- corpus and variants, on loopback ---------------------------------------------
"$bin/hellobench" corpus --images "$images" > "$work/corpus.txt"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start_registry "$work/registry" "127.0.0.1:$port"
reg_pid=$REGISTRY_PID
for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
while read -r name layout; do
  echo "== loading $name"
  skopeo copy -q --dest-tls-verify=false "oci:$layout:latest" "docker://127.0.0.1:$port/$name:legacy"
  "$bin/ctr-remote" image convert --estargz --oci --plain-http \
    "127.0.0.1:$port/$name:legacy" "127.0.0.1:$port/$name:esgz" >/dev/null
  if [[ ,$modes, == *,stargz-store-zstd,* ]]; then
    "$bin/ctr-remote" image convert --zstdchunked --oci --plain-http \
      "127.0.0.1:$port/$name:legacy" "127.0.0.1:$port/$name:zstd" >/dev/null
  fi
done < "$work/corpus.txt"
stop_pid TERM "$reg_pid"

# --- the shaped link; the registry behind it --------------------------------------
mkfifo "$work/link.in"
"$bin/linkshape" --profile "$profile" --prefix "$ns" < "$work/link.in" 2> "$work/link.log" &
link_pid=$!
exec 7> "$work/link.in"
for _ in $(seq 300); do grep -q 'link up' "$work/link.log" && break; sleep 0.1; done
grep -q 'link up' "$work/link.log" || { cat "$work/link.log" >&2; exit 1; }
sed -i "s|addr: 127.0.0.1:$port|addr: $srv|" "$work/registry/config.yml"
ip netns exec "$ns-srv" docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
pids+=("$!")
client=(nsenter "--net=/var/run/netns/$ns-cli")
for _ in $(seq 300); do "${client[@]}" curl -sf "http://$srv/v2/" >/dev/null && break; sleep 0.1; done
tx() { ip -n "$ns-srv" -s -j link show lsh0 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stats64"]["tx"]["bytes"])'; }

printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$srv" > "$work/registries.conf"
echo '{"auths": {}}' > "$work/auth.json"
printf '[[resolver.host."%s".mirrors]]\nhost = "%s"\ninsecure = true\n' "$srv" "$srv" > "$work/store.toml"

# --- samples ------------------------------------------------------------------------
records=$out/$profile.jsonl
: > "$records"
started=$(date -u +%FT%TZ)
load_start=$(cat /proc/loadavg)
IFS=, read -ra mode_list <<< "$modes"
for ((s = 1; s <= samples; s++)); do
  while read -r name _; do
    # The HelloBench corpus's workloads and the line each prints.
    case $name in
      python) expect=hello cmd=(/usr/bin/python3 -c 'print("hello")') ;;
      node) expect=hello cmd=(/usr/bin/node -e 'console.log("hello")') ;;
      debian) expect=hello cmd=(/bin/echo hello) ;;
      *) echo "bench/podman.sh: no workload for $name" >&2; exit 2 ;;
    esac
    for mode in $(printf '%s\n' "${mode_list[@]}" | shuf); do
      d=$work/s$s-$name-$mode
      mkdir -p "$d/tmp" "$d/store"
      printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' "$d/graph" "$d/run" > "$d/storage.conf"
      case $mode in
        ordinary) tag=legacy ;;
        stargz-store) tag=esgz ;;
        stargz-store-zstd) tag=zstd ;;
        *) echo "bench/podman.sh: unknown mode $mode" >&2; exit 2 ;;
      esac
      if [[ $mode != ordinary ]]; then
        printf '[storage.options]\nadditionallayerstores = ["%s:ref"]\n' "$d/store" >> "$d/storage.conf"
        REGISTRY_AUTH_FILE=$work/auth.json "${client[@]}" "$bin/stargz-store" --config "$work/store.toml" \
          --root "$d/store-root" --log-level warn "$d/store" > "$d/store.log" 2>&1 &
        store_pid=$!
        for _ in $(seq 300); do grep -q " $d/store " /proc/self/mountinfo && break; sleep 0.1; done
      fi
      pm=("${client[@]}" env CONTAINERS_STORAGE_CONF="$d/storage.conf"
        CONTAINERS_REGISTRIES_CONF="$work/registries.conf" REGISTRY_AUTH_FILE="$work/auth.json"
        podman --cgroup-manager cgroupfs --events-backend file --tmpdir "$d/tmp")
      img=$srv/$name:$tag
      error=
      b0=$(tx)
      t0=$(date +%s%N)
      "${pm[@]}" pull -q "$img" > "$d/pull.log" 2>&1 || error="pull failed: $(tail -n 3 "$d/pull.log")"
      t1=$(date +%s%N)
      b1=$(tx)
      t2=$t1
      b2=$b1
      if [[ -z $error ]]; then
        mkfifo "$d/out"
        "${pm[@]}" run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
          "$img" "${cmd[@]}" > "$d/out" 2>&1 &
        run_pid=$!
        seen=
        while IFS= read -r line; do
          if [[ $line == *"$expect"* ]]; then seen=1; t2=$(date +%s%N); b2=$(tx); break; fi
        done < "$d/out"
        wait "$run_pid" || true
        [[ -n $seen ]] || error="no line $expect"
      fi
      lazy=$(find "$d/graph/overlay" -maxdepth 2 -name additionallayer 2>/dev/null | wc -l)
      IMAGE=$name MODE=$mode PROFILE=$profile SAMPLE=$s T0=$t0 T1=$t1 T2=$t2 B0=$b0 B1=$b1 B2=$b2 \
        LAZY=$lazy ERROR=$error python3 - "$records" <<'PY'
import json, os, sys
e = os.environ
rec = {"image": e["IMAGE"], "mode": e["MODE"], "profile": e["PROFILE"],
       "sample": int(e["SAMPLE"]),
       "pull_s": (int(e["T1"]) - int(e["T0"])) / 1e9,
       "run_s": (int(e["T2"]) - int(e["T1"])) / 1e9,
       "bytes": int(e["B2"]) - int(e["B0"]), "bytes_pull": int(e["B1"]) - int(e["B0"]),
       "lazy_layers": int(e["LAZY"])}
if e["ERROR"]:
    rec["error"] = e["ERROR"]
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
      echo "   sample $s $name $mode: pull $(( (t1 - t0) / 1000000 )) ms, run $(( (t2 - t1) / 1000000 )) ms, $(( (b2 - b0) / 1000000 )) MB, lazy layers $lazy ${error:+($error)}"
      "${pm[@]}" rm -af -t 0 > /dev/null 2>&1 || true
      "${pm[@]}" rmi -af > /dev/null 2>&1 || true
      stop_store
      unmount_under "$d"
      rm -rf "$d"
    done
  done < "$work/corpus.txt"
done

cat > "$out/$profile-meta.json" <<JSON
{"command": "bench/podman.sh --profile $profile --samples $samples --images $images --modes $modes",
 "profile": "$profile", "link": "$(grep 'link up' "$work/link.log" | sed 's/"/\\"/g')",
 "machine": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) CPUs)",
 "kernel": "$(uname -srm)", "podman": "$(podman --version)",
 "store": "$("$bin/stargz-store" --version)", "binaries": "${BIN_NOTE:-${STARGZ_BIN_DIR:-release build}}",
 "started": "$started", "load_start": "$load_start", "load_end": "$(cat /proc/loadavg)"}
JSON
python3 bench/podman_report.py "$out" "$profile"
