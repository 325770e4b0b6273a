#!/usr/bin/env bash
# Item 15's -P 1 throughput target, one command at a time: redis-benchmark
# -P 1 through twemproxy and through the sidecar, in alternating pairs
# seconds apart, each pair's ratio sidecar/twemproxy, and their median.
# rounds.sh runs SET and GET back to back in one load per proxy; this runs
# a single test per redis-benchmark run, so each pair compares like with
# like at the same moment of this shared machine's drift.
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar
#   sidecar/bench/pairs.sh [pairs] [requests] [test]   # default 15 pairs of 100000 GETs
#
# Uses ports 7600-7629 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

PAIRS=${1:-15}; N=${2:-100000}; TEST=${3:-get}
WORK_PREFIX=cachetier-pairs
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"
need_sidecar

single_node 7600
start_twemproxy 7610 7600 7611
start_sidecar sidecar.log 7620 7600 7621
wait_ping 7610; wait_ping 7620
redis-benchmark -h 127.0.0.1 -p 7600 -c 10 -n 1000 -t set -q >/dev/null 2>&1

# rps PORT: requests per second of one redis-benchmark run
rps() {
  redis-benchmark -h 127.0.0.1 -p "$1" -c 50 -n "$N" -P 1 -t "$TEST" --csv 2>/dev/null \
    | tail -n +2 | tr -d '"' | cut -d, -f2
}

echo "pair | twemproxy/s | sidecar/s | sidecar/twemproxy   (-P 1 $TEST, $N requests, 50 clients)"
rm -f "$WORK/ratios"
for r in $(seq "$PAIRS"); do
  if [ $((r % 2)) = 1 ]; then tw=$(rps 7610); sc=$(rps 7620); else sc=$(rps 7620); tw=$(rps 7610); fi
  awk -v r="$r" -v tw="$tw" -v sc="$sc" -v out="$WORK/ratios" \
    'BEGIN { printf "%4d | %11.0f | %9.0f | %.3f\n", r, tw, sc, sc / tw; print sc / tw >> out }'
done
sort -g "$WORK/ratios" | awk '{ v[NR] = $1; if ($1 < 1) below++ }
  END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "median %.3f, below 1 in %d of %d pairs\n", m, below + 0, NR }'
