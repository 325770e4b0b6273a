# Shared by the bench scripts (sourced): a work dir, the processes they start
# (killed by PID on exit, never by name) and waiting for a port to answer.
# The caller sets WORK_PREFIX first.
export MIMALLOC_ARENA_EAGER_COMMIT=0 # as the image runs it (sidecar/Dockerfile)
WORK=$(mktemp -d "/tmp/${WORK_PREFIX:-cachetier-bench}.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_ping() { # port
  for _ in $(seq 600); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "nothing answers on port $1" >&2
  exit 1
}

twemproxy_conf() { # listen_port redis_port: writes $WORK/nutcracker.yml
  cat > "$WORK/nutcracker.yml" <<YML
bench:
  listen: 127.0.0.1:$1
  hash: fnv1a_64
  distribution: ketama
  redis: true
  servers:
   - 127.0.0.1:$2:1
YML
}
