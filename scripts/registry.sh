# Sourced by the demo and the benchmarks: a throw-away docker-registry.
#
#   start_registry DIR ADDR [NETNS] [SECRET]
#
# writes DIR/config.yml (storage in DIR/storage, listening on ADDR, access log off),
# starts `docker-registry serve` in the background (inside network namespace NETNS
# when given, via `ip netns exec`), its output in DIR/log, and leaves its pid in
# REGISTRY_PID for the caller's cleanup.
start_registry() {
	local dir=$1 addr=$2 netns=${3:-} secret=${4:-}
	mkdir -p "$dir/storage"
	cat >"$dir/config.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
http:
  addr: $addr
${secret:+  secret: $secret}
YML
	if [[ -n $netns ]]; then
		ip netns exec "$netns" docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
	else
		docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
	fi
	REGISTRY_PID=$!
}
