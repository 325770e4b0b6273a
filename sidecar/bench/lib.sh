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

# need_sidecar: BIN is $SIDECAR_BIN, else the release build; stops when
# there is none.
need_sidecar() {
  BIN=${SIDECAR_BIN:-target/release/cachetier-sidecar}
  [ -x "$BIN" ] || BIN=${CARGO_TARGET_DIR:-target}/release/cachetier-sidecar
  [ -x "$BIN" ] || { echo "build first: cargo build --release -p cachetier-sidecar" >&2; exit 1; }
}

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

# start_twemproxy LISTEN REDIS_PORT STATS_PORT: nutcracker in front of one
# node; its PID in $STARTED
start_twemproxy() {
  twemproxy_conf "$1" "$2"
  nutcracker -c "$WORK/nutcracker.yml" -s "$3" -o "$WORK/nutcracker.log" &
  STARTED=$!; PIDS+=($STARTED)
}

# start_sidecar LOG LISTEN SEED METRICS [args...]: $BIN on those ports of
# 127.0.0.1, its output in $WORK/LOG; its PID in $STARTED
start_sidecar() {
  local log=$1 listen=$2 seed=$3 metrics=$4; shift 4
  "$BIN" --listen 127.0.0.1:"$listen" --seed 127.0.0.1:"$seed" --metrics 127.0.0.1:"$metrics" "$@" \
    >"$WORK/$log" 2>&1 &
  STARTED=$!; PIDS+=($STARTED)
}

# single_node PORT [wrapper...]: a cluster-mode redis-server owning every
# slot (run under the wrapper command, if any); its PID in $REDIS
single_node() {
  local port=$1; shift
  mkdir -p "$WORK/redis-$port"
  "$@" redis-server --bind 127.0.0.1 --port "$port" --cluster-enabled yes --cluster-port $((port + 20000)) \
    --cluster-config-file nodes.conf --dir "$WORK/redis-$port" --save '' --appendonly no \
    --logfile redis.log --daemonize no >/dev/null 2>&1 &
  REDIS=$!; PIDS+=($REDIS)
  wait_ping "$port"
  redis-cli -p "$port" cluster addslotsrange 0 16383 >/dev/null
  until redis-cli -p "$port" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
}

# cpu_ns PID: on-CPU nanoseconds of every thread of PID so far
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f", s }'; }
