#!/usr/bin/env bash
# Item 15's targets, each measured in alternating rounds and reported as a
# median: one bench.sh run compares each pair once, seconds apart, and this
# shared 2-core machine's speed drifts by tens of percent within minutes.
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar
#   sidecar/bench/rounds.sh [rounds] [requests]   # default 9 rounds of 100000
#
# One Redis node (cluster mode, owning every slot) behind twemproxy
# (nutcracker), behind the sidecar, and behind a second sidecar with
# `--cache-prefix key:`. Each round, in an order swapped every round:
#   * -P 1 SET and GET through twemproxy and through the sidecar: throughput
#     ratio sidecar/twemproxy, and CPU per request sidecar/twemproxy;
#   * -P 16 SET and GET directly and through the sidecar: sidecar CPU per
#     request / Redis's CPU per request serving the clients itself, on
#     redis-benchmark's one key and on 100 000 random keys (`-r 100000`:
#     Redis then does real dictionary work, the sidecar the same as before);
#   * GETs of ten hot keys at -P 1 and -P 16, directly and through the cached
#     sidecar (all hits after the first): hit CPU / Redis GET CPU.
# CPU is on-CPU time from /proc/<pid>/task/*/schedstat (nanoseconds, every
# thread), not the 10 ms ticks of /proc/<pid>/stat. split.sh says how much
# of the -P 16 time is the kernel's.
# Uses ports 7500-7599 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

ROUNDS=${1:-9}
N=${2:-100000}
CLIENTS=50
WORK_PREFIX=cachetier-rounds
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"
need_sidecar

single_node 7500

start_twemproxy 7510 7500 7511
TW=$STARTED
start_sidecar sidecar.log 7520 7500 7521
SC=$STARTED
start_sidecar sidecar-cache.log 7530 7500 7531 --cache-prefix key: --cache-ttl 600s --cache-max-bytes 64MiB
SCC=$STARTED
for p in 7510 7520 7530; do wait_ping "$p"; done
redis-benchmark -h 127.0.0.1 -p 7500 -c 10 -n 1000 -t set -r 10 -q >/dev/null 2>&1

# rps PORT PIPE TEST [args]: requests per second of one redis-benchmark run
rps() {
  local port=$1 pipe=$2 test=$3; shift 3
  redis-benchmark -h 127.0.0.1 -p "$port" -c "$CLIENTS" -n "$N" -P "$pipe" -t "$test" "$@" --csv 2>/dev/null \
    | tail -n +2 | tr -d '"' | cut -d, -f2
}
# load PID PORT PIPE TESTS [args]: "rps... cpu_ns" of PID over one run per test
load() {
  local pid=$1 port=$2 pipe=$3 tests=$4 c0 out=""; shift 4
  c0=$(cpu_ns "$pid")
  for t in ${tests//,/ }; do out="$out $(rps "$port" "$pipe" "$t" "$@")"; done
  echo "$out $(( $(cpu_ns "$pid") - c0 ))"
}
# pair A B: run the commands A and B, A first on odd rounds
pair() { if [ $((r % 2)) = 1 ]; then a=$(eval "$1"); b=$(eval "$2"); else b=$(eval "$2"); a=$(eval "$1"); fi; }

printf '%-5s | %-26s | %-21s | %-21s\n' "" "-P 1 sidecar/twemproxy" "-P 16 CPU sc/Redis" "cache hit / Redis GET"
printf '%-5s | %8s %8s %8s | %10s %10s | %10s %10s\n' round "SET/s" "GET/s" CPU "1 key" "100k keys" "-P 1" "-P 16"
rm -f "$WORK/ratios"
for r in $(seq "$ROUNDS"); do
  pair 'load $TW 7510 1 set,get' 'load $SC 7520 1 set,get'
  read -r tws twg twc <<<"$a"; read -r scs scg scc <<<"$b"
  pair 'load $REDIS 7500 16 set,get' 'load $SC 7520 16 set,get'
  read -r _ _ rc16 <<<"$a"; read -r _ _ sc16 <<<"$b"
  pair 'load $REDIS 7500 16 set,get -r 100000' 'load $SC 7520 16 set,get -r 100000'
  read -r _ _ rk16 <<<"$a"; read -r _ _ sk16 <<<"$b"
  pair 'load $REDIS 7500 1 get -r 10' 'load $SCC 7530 1 get -r 10'
  read -r _ rg1 <<<"$a"; read -r _ h1 <<<"$b"
  pair 'load $REDIS 7500 16 get -r 10' 'load $SCC 7530 16 get -r 10'
  read -r _ rg16 <<<"$a"; read -r _ h16 <<<"$b"
  awk -v r="$r" -v tws="$tws" -v scs="$scs" -v twg="$twg" -v scg="$scg" -v twc="$twc" -v scc="$scc" \
    -v rc16="$rc16" -v sc16="$sc16" -v rg1="$rg1" -v h1="$h1" -v rg16="$rg16" -v h16="$h16" \
    -v rk16="$rk16" -v sk16="$sk16" -v out="$WORK/ratios" 'BEGIN {
      v[1] = scs / tws; v[2] = scg / twg; v[3] = scc / twc; v[4] = sc16 / rc16; v[5] = h1 / rg1; v[6] = h16 / rg16
      v[7] = sk16 / rk16
      printf "%-5s | %8.2f %8.2f %8.2f | %10.2f %10.2f | %10.2f %10.2f\n", r, v[1], v[2], v[3], v[4], v[7], v[5], v[6]
      printf "%f %f %f %f %f %f %f\n", v[1], v[2], v[3], v[4], v[5], v[6], v[7] >> out
    }'
done
median() { cut -d' ' -f"$1" "$WORK/ratios" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
count() { cut -d' ' -f"$1" "$WORK/ratios" | awk -v op="$2" -v t="$3" '(op == "<" && $1 < t) || (op == ">" && $1 > t) { n++ } END { print n + 0 }'; }
printf '%-5s | %8s %8s %8s | %10s %10s | %10s %10s\n' median "$(median 1)" "$(median 2)" "$(median 3)" "$(median 4)" "$(median 7)" "$(median 5)" "$(median 6)"
echo "targets over $ROUNDS rounds of $N requests:"
echo "  -P 1 throughput >= twemproxy's: SET median $(median 1) (below in $(count 1 '<' 1) rounds), GET median $(median 2) (below in $(count 2 '<' 1))"
echo "  -P 16 sidecar CPU <= Redis's: one key median $(median 4) (above in $(count 4 '>' 1) rounds), 100k keys median $(median 7) (above in $(count 7 '>' 1))"
echo "  cache hit <= half a Redis GET: -P 1 median $(median 5), -P 16 median $(median 6) (above 0.5 in $(count 5 '>' 0.5) and $(count 6 '>' 0.5) rounds)"
