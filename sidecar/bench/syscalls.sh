#!/usr/bin/env bash
# System calls per request, counted with `strace -c -f` over a fixed number of
# GETs of ten hot keys: redis-server serving the clients itself, the sidecar
# with the local cache (all hits) and the sidecar without it, each in front
# of one Redis node owning every slot, at -P 1 and -P 16. The kernel's share
# of a request's CPU follows from these calls (loopback TCP on each read and
# write); strace slows the process, so only the counts are reported.
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar
#   sidecar/bench/syscalls.sh [requests]   # default 30000 per row
#
# Needs strace, redis-server, redis-cli, redis-benchmark.
# Uses ports 7420-7424 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

N=${1:-30000}
WORK_PREFIX=cachetier-syscalls
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"
need_sidecar

single_node 7420
R=$REDIS
start_sidecar sidecar.log 7421 7420 7422
S=$STARTED
start_sidecar sidecar-cache.log 7423 7420 7424 --cache-prefix key: --cache-ttl 60s
C=$STARTED
wait_ping 7421
wait_ping 7423
sleep 2 # the tracking connection
redis-benchmark -h 127.0.0.1 -p 7420 -c 10 -n 1000 -t set -r 10 -q >/dev/null 2>&1

# row LABEL PID PORT PIPE: the calls PID makes per GET while redis-benchmark
# sends N of them to PORT (after a warm-up), the five most frequent.
row() {
  local label=$1 pid=$2 port=$3 pipe=$4
  redis-benchmark -h 127.0.0.1 -p "$port" -c 50 -n 2000 -P "$pipe" -t get -r 10 -q >/dev/null 2>&1
  strace -c -f -p "$pid" -o "$WORK/strace.$label.$pipe" 2>/dev/null &
  local tracer=$!
  sleep 0.5 # attached
  timeout 600 redis-benchmark -h 127.0.0.1 -p "$port" -c 50 -n "$N" -P "$pipe" -t get -r 10 -q >/dev/null 2>&1
  kill -INT "$tracer"
  wait "$tracer" || true
  awk -v n="$N" -v label="$label" -v pipe="$pipe" '
    $NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ {
      if ($NF == "total") total = $4 / n; else calls[$NF] = $4 / n
    }
    END {
      line = sprintf("%-36s P=%-3s %6.3f calls per GET:", label, pipe, total)
      for (k = 0; k < 5; k++) {
        best = ""; for (c in calls) if (best == "" || calls[c] > calls[best]) best = c
        if (best == "") break
        line = line sprintf(" %s %.3f", best, calls[best]); delete calls[best]
      }
      print line
    }' "$WORK/strace.$label.$pipe"
}

echo "system calls per GET (ten hot keys, 50 clients), $N GETs per row"
for pipe in 1 16; do
  row "redis-server, clients direct" "$R" 7420 "$pipe"
  row "sidecar, local-cache hits" "$C" 7423 "$pipe"
  row "sidecar, no cache" "$S" 7421 "$pipe"
done
