#!/usr/bin/env bash
# The remote-node case the local cache exists for (issue 9, item 16): one
# Redis node behind a delay relay that adds DELAY_US (default 250 µs, a
# datacenter hop) each way, and a zipfian GET load over KEYS keys:
#   1. clients -> relay -> redis            (direct, every GET crosses the hop)
#   2. clients -> sidecar -> relay -> redis (no cache)
#   3. clients -> sidecar+cache -> relay -> redis
# Each row (after an untimed warm-up of N/4 GETs of the same load):
# throughput, p50/p99 latency of a request, and upstream requests
# per client request (Redis's total_commands_processed over the run, which
# includes the sidecar's own topology, gate and tracking commands).
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar --bin cachetier-sidecar --examples
#   sidecar/bench/remote.sh [requests]           # default 200000 per row
# Environment: DELAY_US (250), KEYS (10000), ZIPF_S (0.99), CLIENTS (50),
#   PIPELINE (1), MAX_SECONDS (120, per row).
# Uses ports 7600-7609 on 127.0.0.1 and a temp dir; stops only what it started.
set -euo pipefail

N=${1:-200000}
DELAY_US=${DELAY_US:-250}
KEYS=${KEYS:-10000}
ZIPF_S=${ZIPF_S:-0.99}
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-1}
MAX_SECONDS=${MAX_SECONDS:-120}
DIR=${CARGO_TARGET_DIR:-target}/release
BIN=${SIDECAR_BIN:-$DIR/cachetier-sidecar}
for b in "$BIN" "$DIR/examples/delay_relay" "$DIR/examples/zipf_load"; do
  [ -x "$b" ] || { echo "build first: cargo build --release -p cachetier-sidecar --bin cachetier-sidecar --examples" >&2; exit 1; }
done
WORK_PREFIX=cachetier-remote
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"

# Redis announces the relay's port, so the sidecar's slot map (and with it
# every data, gate and tracking connection) goes through the relay.
redis-server --bind 127.0.0.1 --port 7600 --cluster-enabled yes --cluster-config-file nodes.conf \
  --cluster-announce-ip 127.0.0.1 --cluster-announce-port 7601 \
  --dir "$WORK" --save '' --appendonly no --logfile redis.log >/dev/null 2>&1 &
PIDS+=($!)
wait_ping 7600
redis-cli -p 7600 cluster addslotsrange 0 16383 >/dev/null
until redis-cli -p 7600 cluster info | grep -q cluster_state:ok; do sleep 0.1; done
"$DIR/examples/delay_relay" --listen 127.0.0.1:7601 --target 127.0.0.1:7600 --delay-us "$DELAY_US" \
  --max-seconds 3600 >"$WORK/relay.log" 2>&1 &
PIDS+=($!)
wait_ping 7601
"$DIR/examples/zipf_load" --port 7600 --keys "$KEYS" --fill --value-bytes 100

start_sidecar sidecar.log 7602 7601 7604
start_sidecar sidecar-cache.log 7603 7601 7605 --cache-prefix key: --cache-ttl 60s --cache-max-bytes 64MiB
wait_ping 7602
wait_ping 7603
sleep 2 # first read-gate poll, tracking connection

processed() { redis-cli -p 7600 info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p'; }

echo "one-way delay ${DELAY_US} µs, ${KEYS} keys, zipf s=${ZIPF_S}, ${CLIENTS} clients, pipeline ${PIPELINE}, ${N} GETs per row"
row() { # label port
  local before after
  # Warm-up (untimed): the cache's steady state for the hot keys.
  "$DIR/examples/zipf_load" --port "$2" --requests $((N / 4)) --clients "$CLIENTS" --keys "$KEYS" \
    --zipf-s "$ZIPF_S" --pipeline "$PIPELINE" --max-seconds "$MAX_SECONDS" >/dev/null
  before=$(processed)
  local out
  out=$("$DIR/examples/zipf_load" --port "$2" --requests "$N" --clients "$CLIENTS" --keys "$KEYS" \
    --zipf-s "$ZIPF_S" --pipeline "$PIPELINE" --max-seconds "$MAX_SECONDS")
  after=$(processed)
  # One INFO of ours between the two readings.
  local done
  done=$(echo "$out" | awk '{print $2}')
  printf '%-30s %s; upstream/request %s\n' "$1" "$out" \
    "$(awk -v u=$((after - before - 1)) -v n="$done" 'BEGIN { printf "%.4f", u / n }')"
}
row "direct through the relay" 7601
row "sidecar, no cache" 7602
row "sidecar + local cache" 7603
