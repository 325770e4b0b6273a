#!/usr/bin/env bash
# Where the CPU goes: on-CPU time per request of the sidecar and of Redis
# serving the same -P 16 SET+GET load directly, split into kernel and user
# space by perf's timer samples (`perf record -e cpu-clock`, which needs no
# hardware counters and samples the kernel too, which callgrind cannot).
# Read with rounds.sh: when the sidecar costs more CPU than Redis although it
# executes fewer user-space instructions (instructions.sh), this says whether
# the excess is in the kernel (syscalls, TCP) or in user space.
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar
#   sidecar/bench/split.sh [requests] [redis-benchmark args...]
#     # default 1000000 per test, redis-benchmark's one key; e.g.
#     # `sidecar/bench/split.sh 1000000 -r 100000` for 100 000 random keys
#
# Needs perf (Debian linux-perf). The ratio of /proc/<pid>/stat's user and
# system ticks is not used: on this VM it disagreed with perf's samples
# (kernel 49 % of the sidecar's ticks against 43 % of its samples).
# Uses ports 7540-7549 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

N=${1:-1000000}
shift || true
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }
WORK_PREFIX=cachetier-split
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"
need_sidecar

single_node 7540
start_sidecar sidecar.log 7541 7540 7542
SC=$STARTED
wait_ping 7541

load() { # port [redis-benchmark args...]
  local port=$1; shift
  redis-benchmark -h 127.0.0.1 -p "$port" -c 50 -n "$N" -P 16 -t set,get -q "$@" >/dev/null 2>&1
}
# measure LABEL PID PORT: ns per request, and the kernel's share of samples
measure() {
  local label=$1 pid=$2 port=$3 c0 c1 kernel
  load "$port" "${EXTRA[@]}" # warm up
  c0=$(cpu_ns "$pid")
  perf record -q -e cpu-clock -F 2000 -p "$pid" -o "$WORK/$label.data" >/dev/null 2>&1 &
  local perf_pid=$!
  sleep 0.3 # perf attached
  load "$port" "${EXTRA[@]}"
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
  c1=$(cpu_ns "$pid")
  kernel=$(perf report -i "$WORK/$label.data" --sort dso --stdio 2>/dev/null \
    | awk '/^ *[0-9.]+%/ && /\[kernel/ { gsub("%", "", $1); k += $1 } END { printf "%.1f", k }')
  awk -v l="$label" -v c="$((c1 - c0))" -v n="$((2 * N))" -v k="$kernel" 'BEGIN {
    t = c / n; printf "%-8s %8.0f ns/request: kernel %5.1f %% = %6.0f ns, user %6.0f ns\n", l, t, k, t * k / 100, t * (100 - k) / 100
  }'
}
EXTRA=("$@")
echo "-P 16 SET+GET, $N requests per test${EXTRA[*]:+, redis-benchmark ${EXTRA[*]}}"
measure redis "$REDIS" 7540
measure sidecar "$SC" 7541
