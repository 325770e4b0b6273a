#!/usr/bin/env bash
# Sidecar benchmark: direct Redis vs cachetier sidecar vs twemproxy (nutcracker)
# in front of the same single Redis node, then the sidecar in front of a
# 3-shard cluster, then a hot-key workload with the local cache.
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar
#   sidecar/bench/bench.sh [requests]        # default 200000 per run
#
# Prints one table; every ratio in it comes from this one run on this machine.
# CPU per 100k requests (utime+stime from /proc/<pid>/stat around each run) is
# given for the sidecar, twemproxy and the redis-server itself, so each row
# has sidecar CPU / Redis CPU from the same run. CPU time has 10 ms ticks and
# is noisy on a shared machine: bench/instructions.sh counts instructions.
# Uses ports 7100-7399 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

N=${1:-200000}
CLIENTS=50
BIN=${SIDECAR_BIN:-target/release/cachetier-sidecar}
[ -x "$BIN" ] || BIN=${CARGO_TARGET_DIR:-target}/release/cachetier-sidecar
[ -x "$BIN" ] || { echo "build first: cargo build --release -p cachetier-sidecar" >&2; exit 1; }
# As the image runs it (sidecar/Dockerfile).
export MIMALLOC_ARENA_EAGER_COMMIT=0
WORK=$(mktemp -d /tmp/cachetier-bench.XXXXXX)
PIDS=()
declare -A REDIS_PID # port -> pid of the redis-server this script started
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

redis_node() { # port
  local port=$1
  mkdir -p "$WORK/$port"
  redis-server --bind 127.0.0.1 --port "$port" --cluster-enabled yes \
    --cluster-port $((port + 20000)) --cluster-config-file nodes.conf \
    --dir "$WORK/$port" --save '' --appendonly no --repl-diskless-sync-delay 0 \
    --logfile redis.log --daemonize no >/dev/null 2>&1 &
  PIDS+=($!)
  REDIS_PID[$port]=$!
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# ms_per_100k TICKS REQUESTS: CPU milliseconds per 100k requests
ms_per_100k() { awk -v t="$1" -v hz="$HZ" -v n="$2" 'BEGIN { printf "%.1f", t * 1000 / hz / n * 100000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# bench LABEL PORT PIPELINE [extra redis-benchmark args...]
# redis-benchmark --csv columns: test,rps,avg,min,p50,p95,p99,max
bench() {
  local label=$1 port=$2 pipe=$3; shift 3
  redis-benchmark -h 127.0.0.1 -p "$port" -c "$CLIENTS" -n "$N" -P "$pipe" --csv "$@" 2>/dev/null \
    | tail -n +2 | tr -d '"' | while IFS=, read -r test rps avg min p50 p95 p99 max; do
        printf '%-34s %-4s P=%-3s %12s %8s %8s\n' "$label" "$test" "$pipe" "$rps" "$p50" "$p99"
      done
}

# --- one Redis node owning every slot ----------------------------------------
redis_node 7100
redis-cli -p 7100 cluster addslotsrange 0 16383 >/dev/null
until redis-cli -p 7100 cluster info | grep -q cluster_state:ok; do sleep 0.1; done

cat > "$WORK/nutcracker.yml" <<YML
bench:
  listen: 127.0.0.1:7200
  hash: fnv1a_64
  distribution: ketama
  redis: true
  servers:
   - 127.0.0.1:7100:1
YML
nutcracker -c "$WORK/nutcracker.yml" -s 7201 -o "$WORK/nutcracker.log" &
TW=$!; PIDS+=($TW)

"$BIN" --listen 127.0.0.1:7300 --seed 127.0.0.1:7100 --metrics 127.0.0.1:7301 >"$WORK/sidecar1.log" 2>&1 &
SC1=$!; PIDS+=($SC1)
until redis-cli -p 7300 ping >/dev/null 2>&1 && redis-cli -p 7200 ping >/dev/null 2>&1; do sleep 0.1; done

printf '%-34s %-4s %-5s %12s %8s %8s\n' "target" "cmd" "pipe" "req/s" "p50 ms" "p99 ms"
R1=${REDIS_PID[7100]}
for pipe in 1 16; do
  r0=$(cpu_ticks "$R1")
  bench "redis direct" 7100 "$pipe" -t set,get
  r1=$(cpu_ticks "$R1"); tw0=$(cpu_ticks "$TW")
  bench "twemproxy -> redis" 7200 "$pipe" -t set,get
  tw1=$(cpu_ticks "$TW"); r2=$(cpu_ticks "$R1"); sc0=$(cpu_ticks "$SC1")
  bench "sidecar -> redis" 7300 "$pipe" -t set,get
  sc1=$(cpu_ticks "$SC1"); r3=$(cpu_ticks "$R1")
  n=$((2 * N))
  direct=$(ms_per_100k $((r1 - r0)) $n)
  side=$(ms_per_100k $((sc1 - sc0)) $n)
  tw=$(ms_per_100k $((tw1 - tw0)) $n)
  printf '%-34s CPU per 100k requests: sidecar %s ms, twemproxy %s ms\n' "  (P=$pipe)" "$side" "$tw"
  printf '%-34s Redis: serving clients directly %s ms, behind twemproxy %s ms, behind the sidecar %s ms\n' \
    "  (P=$pipe)" "$direct" "$(ms_per_100k $((r2 - r1)) $n)" "$(ms_per_100k $((r3 - r2)) $n)"
  printf '%-34s sidecar CPU / Redis CPU (direct): %s; twemproxy / Redis: %s\n' "  (P=$pipe)" \
    "$(ratio "$side" "$direct")" "$(ratio "$tw" "$direct")"
done
echo "  sidecar RSS after the single-node runs: $(rss_kib $SC1) KiB"

# --- 3 shards x (1 primary + 1 replica) ---------------------------------------
ports=(7110 7111 7112 7113 7114 7115)
for p in "${ports[@]}"; do redis_node "$p"; done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 --cluster-yes >/dev/null
until [ "$(redis-cli -p 7110 cluster info | grep -c cluster_state:ok)" = 1 ] \
  && [ "$(redis-cli -p 7110 cluster nodes | awk '$3 ~ /slave/' | wc -l)" = 3 ]; do sleep 0.2; done
sleep 1
"$BIN" --listen 127.0.0.1:7310 --seed 127.0.0.1:7110 --metrics 127.0.0.1:7311 >"$WORK/sidecar3.log" 2>&1 &
SC3=$!; PIDS+=($SC3)
until redis-cli -p 7310 ping >/dev/null 2>&1; do sleep 0.1; done
sleep 2 # first read-gate poll
for pipe in 1 16; do
  bench "sidecar -> 3-shard cluster" 7310 "$pipe" -t set,get -r 100000
done

# --- hot keys with the local cache --------------------------------------------
"$BIN" --listen 127.0.0.1:7320 --seed 127.0.0.1:7110 --metrics 127.0.0.1:7321 \
  --cache-prefix key: --cache-ttl 60s --cache-max-bytes 64MiB >"$WORK/sidecar-cache.log" 2>&1 &
SCC=$!; PIDS+=($SCC)
until redis-cli -p 7320 ping >/dev/null 2>&1; do sleep 0.1; done
sleep 2
redis-benchmark -h 127.0.0.1 -p 7110 -c 10 -n 1000 -t set -r 10 -q >/dev/null 2>&1 || true
for p in 7100 "${ports[@]}"; do redis-cli -p "$p" config resetstat >/dev/null; done
r0=$(cpu_ticks "$R1")
bench "redis direct (hot keys)" 7100 1 -t get -r 10
r1=$(cpu_ticks "$R1"); c0=$(cpu_ticks "$SCC")
bench "sidecar+cache -> cluster (hot)" 7320 1 -t get -r 10
c1=$(cpu_ticks "$SCC"); r2=$(cpu_ticks "$R1")
bench "redis direct (hot keys)" 7100 16 -t get -r 10
r3=$(cpu_ticks "$R1"); c2=$(cpu_ticks "$SCC")
bench "sidecar+cache -> cluster (hot)" 7320 16 -t get -r 10
c3=$(cpu_ticks "$SCC")
for pipe in 1 16; do
  if [ "$pipe" = 1 ]; then hit=$(ms_per_100k $((c1 - c0)) "$N"); get=$(ms_per_100k $((r1 - r0)) "$N")
  else hit=$(ms_per_100k $((c3 - c2)) "$N"); get=$(ms_per_100k $((r3 - r2)) "$N"); fi
  printf '%-34s CPU per 100k GETs: sidecar cache hits %s ms, Redis GETs %s ms; hit / Redis GET: %s\n' \
    "  (hot, P=$pipe)" "$hit" "$get" "$(ratio "$hit" "$get")"
done
upstream=0
for p in "${ports[@]}"; do
  c=$(redis-cli -p "$p" info commandstats | sed -n 's/^cmdstat_get:calls=\([0-9]*\),.*/\1/p')
  upstream=$((upstream + ${c:-0}))
done
awk -v u="$upstream" -v n=$((2 * N)) 'BEGIN { printf "hot-key upstream GETs: %d for %d client GETs (%.4f%%)\n", u, n, u * 100 / n }'
