#!/usr/bin/env bash
# User-space instructions per request, counted with valgrind's callgrind on a
# fixed number of requests: the sidecar (in front of one Redis node owning
# every slot), twemproxy (Debian's nutcracker) in front of the same node, and
# redis-server itself serving the same load directly, at -P 1 and -P 16, and a
# local-cache hit against a Redis GET. Deterministic where
# CPU time on a shared machine is not; kernel work (syscalls, TCP) is not
# counted, and both sides make about the same syscalls per request.
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar
#   sidecar/bench/instructions.sh [requests]   # default 20000 per test
#
# Needs valgrind (callgrind_control), redis-server, redis-cli, redis-benchmark,
# nutcracker.
# Uses ports 7400-7409 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

N=${1:-20000}
WORK_PREFIX=cachetier-instr
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"
need_sidecar

callgrind() { exec valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$1.%p" "${@:2}"; }

# count LABEL PID PORT PIPE TESTS [redis-benchmark args...]: instructions of
# PID per request while redis-benchmark sends N requests per test to PORT.
count() {
  local label=$1 pid=$2 port=$3 pipe=$4 tests=$5; shift 5
  # Warm-up: connections, metric series, cache fills.
  redis-benchmark -h 127.0.0.1 -p "$port" -c 50 -n 2000 -P "$pipe" -t "$tests" "$@" -q >/dev/null 2>&1
  callgrind_control -z "$pid" >/dev/null 2>&1
  timeout 600 redis-benchmark -h 127.0.0.1 -p "$port" -c 50 -n "$N" -P "$pipe" -t "$tests" "$@" -q >/dev/null 2>&1
  rm -f "$WORK"/cg.*."$pid".*
  callgrind_control -d "$pid" >/dev/null 2>&1
  local ir ntests
  for _ in $(seq 50); do ls "$WORK"/cg.*."$pid".* >/dev/null 2>&1 && break; sleep 0.1; done
  sleep 0.5
  ir=$(cat "$WORK"/cg.*."$pid".* | awk '/^summary:/ { s += $2 } END { print s + 0 }')
  ntests=$(echo "$tests" | tr , '\n' | wc -l)
  printf '%-44s P=%-3s %8d instructions per request\n' "$label" "$pipe" $((ir / (N * ntests)))
}

echo "instructions per request, $N requests per test (SET+GET rows: both tests)"
# Redis serving the clients itself.
single_node 7400 callgrind redis
R=$REDIS
for pipe in 1 16; do count "redis-server, clients direct (SET+GET)" "$R" 7400 "$pipe" set,get; done
for pipe in 1 16; do count "redis-server, clients direct (GET, 10 keys)" "$R" 7400 "$pipe" get -r 10; done

# The sidecar in front of a plain node.
single_node 7402
callgrind sidecar "$BIN" --listen 127.0.0.1:7403 --seed 127.0.0.1:7402 --metrics 127.0.0.1:7405 >"$WORK/sidecar.log" 2>&1 &
S=$!; PIDS+=($S)
wait_ping 7403
for pipe in 1 16; do count "sidecar -> redis (SET+GET)" "$S" 7403 "$pipe" set,get; done

# twemproxy in front of the same node.
twemproxy_conf 7407 7402
callgrind twemproxy nutcracker -c "$WORK/nutcracker.yml" -s 7408 -o "$WORK/nutcracker.log" &
T=$!; PIDS+=($T)
wait_ping 7407
for pipe in 1 16; do count "twemproxy -> redis (SET+GET)" "$T" 7407 "$pipe" set,get; done

# Local-cache hits: ten hot keys, cached.
callgrind cache "$BIN" --listen 127.0.0.1:7404 --seed 127.0.0.1:7402 --metrics 127.0.0.1:7406 \
  --cache-prefix key: --cache-ttl 60s >"$WORK/sidecar-cache.log" 2>&1 &
C=$!; PIDS+=($C)
wait_ping 7404
sleep 2 # the tracking connection
redis-benchmark -h 127.0.0.1 -p 7402 -c 10 -n 1000 -t set -r 10 -q >/dev/null 2>&1
for pipe in 1 16; do count "sidecar, local-cache hits (GET, 10 keys)" "$C" 7404 "$pipe" get -r 10; done
