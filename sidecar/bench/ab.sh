#!/usr/bin/env bash
# A/B of two sidecar binaries in front of one Redis node (cluster mode,
# owning every slot): on-CPU nanoseconds per request of each, measured in
# alternating pairs, and the median of the per-pair ratio B/A. Pairs taken
# seconds apart cancel most of this shared machine's drift, which single
# runs do not.
#
# Usage (from the repository root):
#   sidecar/bench/ab.sh OLD_BINARY NEW_BINARY [pairs] [requests]   # default 12 pairs of 200000
#   PIPE=1 sidecar/bench/ab.sh ...                                 # -P 1 instead of -P 16
#
# Uses ports 7440-7449 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

A=${1:?old binary}; B=${2:?new binary}
PAIRS=${3:-12}; N=${4:-200000}; PIPE=${PIPE:-16}
WORK_PREFIX=cachetier-ab
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"

single_node 7440
"$A" --listen 127.0.0.1:7441 --seed 127.0.0.1:7440 --metrics 127.0.0.1:7442 >"$WORK/a.log" 2>&1 &
PA=$!; PIDS+=($PA)
"$B" --listen 127.0.0.1:7443 --seed 127.0.0.1:7440 --metrics 127.0.0.1:7444 >"$WORK/b.log" 2>&1 &
PB=$!; PIDS+=($PB)
wait_ping 7441; wait_ping 7443

# run PID PORT: on-CPU nanoseconds of PID over one SET+GET run of N each
run() {
  local c0; c0=$(cpu_ns "$1")
  redis-benchmark -h 127.0.0.1 -p "$2" -c 50 -n "$N" -P "$PIPE" -t set,get -q >/dev/null 2>&1
  echo $(( $(cpu_ns "$1") - c0 ))
}
run "$PA" 7441 >/dev/null; run "$PB" 7443 >/dev/null # warm-up
echo "-P $PIPE SET+GET, $N requests per test, on-CPU ns per request"
for r in $(seq "$PAIRS"); do
  if [ $((r % 2)) = 1 ]; then a=$(run "$PA" 7441); b=$(run "$PB" 7443); else b=$(run "$PB" 7443); a=$(run "$PA" 7441); fi
  echo "$r $a $b" | awk -v n="$N" '{ printf "pair %-3s A %5.0f  B %5.0f  B/A %.3f\n", $1, $2 / (2 * n), $3 / (2 * n), $3 / $2 }'
  echo "$b $a" | awk '{ print $1 / $2 }' >>"$WORK/ratios"
done
sort -g "$WORK/ratios" | awk '{ v[NR] = $1; if ($1 < 1) lower++ }
  END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "median B/A %.3f over %d pairs (B lower in %d)\n", m, NR, lower }'
