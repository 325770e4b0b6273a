#!/usr/bin/env bash
# Locked instructions (lock-prefixed read-modify-writes and xchg: reference
# counts, mutexes, atomic counters) the sidecar executes per request, and in
# which functions, counted exactly with callgrind per instruction over a
# fixed number of requests. On x86 each costs tens of cycles even without
# contention, and a single-threaded Redis runs none: at -P 16 perf put a
# third of the sidecar's user-space samples right after one.
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar
#   sidecar/bench/locked.sh [requests]        # default 20000 per test, -P 16
#   PIPE=1 sidecar/bench/locked.sh            # unpipelined
#   CACHED=1 sidecar/bench/locked.sh          # local-cache hits (GET, 10 keys)
#
# Needs valgrind (callgrind_control), objdump (binutils), redis-server,
# redis-cli, redis-benchmark.
# Uses ports 7410-7419 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

N=${1:-20000}
PIPE=${PIPE:-16}
WORK_PREFIX=cachetier-locked
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"
need_sidecar
BIN=$(readlink -f "$BIN")

if [ -n "${CACHED:-}" ]; then
  args=(--cache-prefix key: --cache-ttl 600s --cache-max-bytes 64MiB)
  tests=(-t get -r 10)
  requests=$N
else
  args=()
  tests=(-t set,get)
  requests=$((2 * N))
fi

single_node 7410
valgrind --tool=callgrind --dump-instr=yes --instr-atstart=no --callgrind-out-file="$WORK/cg.out" \
  "$BIN" --listen 127.0.0.1:7411 --seed 127.0.0.1:7410 --metrics 127.0.0.1:7412 "${args[@]}" \
  >"$WORK/sidecar.log" 2>&1 &
S=$!; PIDS+=($S)
wait_ping 7411
sleep 2 # the cache's tracking connection, if any
# Warm-up uncounted (connections, metric series, cache fills), then N per test.
redis-benchmark -h 127.0.0.1 -p 7411 -c 50 -n 5000 -P "$PIPE" "${tests[@]}" -q >/dev/null 2>&1
callgrind_control -i on "$S" >/dev/null 2>&1
redis-benchmark -h 127.0.0.1 -p 7411 -c 50 -n "$N" -P "$PIPE" "${tests[@]}" -q >/dev/null 2>&1
callgrind_control -i off "$S" >/dev/null 2>&1
callgrind_control -d "$S" >/dev/null 2>&1
for _ in $(seq 50); do ls "$WORK"/cg.out.* >/dev/null 2>&1 && break; sleep 0.1; done
sleep 0.5

# Addresses of the binary's locked instructions, with their function
# (`xchg %ax,%ax` is a two-byte no-op, not a locked exchange).
objdump -d --no-show-raw-insn -C "$BIN" | awk '
  /^[0-9a-f]+ <.*>:$/ { fn = substr($0, index($0, "<") + 1); sub(/>:$/, "", fn); next }
  $2 == "lock" || ($2 ~ /^xchg/ && $0 !~ /%ax,%ax/) { a = $1; sub(/:$/, "", a); print a, fn }
' >"$WORK/locked.txt"

# callgrind's file: "positions: instr line", cost lines "<instr> <line> <Ir>"
# with instr absolute (0x...), relative (+n/-n) or repeated (*); the line
# after a calls= line is a call's inclusive cost, not an instruction's.
cat "$WORK"/cg.out.* | awk -v n="$requests" -v pipe="$PIPE" -v bin="$BIN" '
  function hex(s,   i, v) {
    v = 0; s = tolower(s); sub(/^0x/, "", s)
    for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
    return v
  }
  FNR == NR { name = substr($0, length($1) + 2); locked[hex($1)] = name; next }
  /^ob=/ {
    id = substr($0, 5, index($0, ")") - 5)
    rest = substr($0, index($0, ")") + 2)
    if (rest != "") objs[id] = rest
    inbin = (objs[id] == bin); next
  }
  /^calls=/ { skip = 1; next }
  /^(0x|[+*-])/ {
    p = $1
    if (p ~ /^0x/) addr = hex(p); else if (p ~ /^\+/) addr += substr(p, 2) + 0
    else if (p ~ /^-/) addr -= substr(p, 2) + 0
    if (skip) { skip = 0; next }
    if (inbin && NF >= 3) { ir += $3; if (addr in locked) { by[locked[addr]] += $3; total += $3 } }
    next
  }
  END {
    printf "-P %s: %.0f user-space instructions and %.2f locked instructions per request\n", pipe, ir / n, total / n
    for (f in by) printf "%8.2f  %s\n", by[f] / n, f | "sort -rn | head -25"
  }
' "$WORK/locked.txt" -
