#!/usr/bin/env bash
# Mixed-load hit rate of the local cache: hot GETs on 100 keys under the
# cached prefix while random SETs write other keys under the same prefix.
# Usage (repository root): SIDECAR_BIN=... sidecar/bench/mixed_hit_rate.sh
# WRITES=0 for the reads alone; GETS=, SETS= set the request counts.
# Uses ports 7110-7119 on 127.0.0.1 (and 27110-27112); needs curl.
# Stops only what it started.
set -euo pipefail
BIN=${SIDECAR_BIN:-target/release/cachetier-sidecar}
WORK=$(mktemp -d /tmp/cachetier-mixed.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
for port in 7110 7111 7112; do
  mkdir -p "$WORK/$port"
  redis-server --bind 127.0.0.1 --port $port --cluster-enabled yes --cluster-port $((port+20000)) \
    --cluster-config-file nodes.conf --dir "$WORK/$port" --save '' --appendonly no --logfile redis.log >/dev/null 2>&1 &
  PIDS+=($!)
done
for port in 7110 7111 7112; do until redis-cli -p $port ping >/dev/null 2>&1; do sleep 0.05; done; done
redis-cli --cluster create 127.0.0.1:7110 127.0.0.1:7111 127.0.0.1:7112 --cluster-yes >/dev/null
until redis-cli -p 7110 cluster info | grep -q 'cluster_state:ok'; do sleep 0.1; done
sleep 1
$BIN --listen 127.0.0.1:7119 --seed 127.0.0.1:7110 --metrics 127.0.0.1:7118 --cache-prefix key: >"$WORK/sidecar.log" 2>&1 &
PIDS+=($!)
until redis-cli -p 7119 ping >/dev/null 2>&1; do sleep 0.1; done
sleep 1
metric() { curl -s http://127.0.0.1:7118/metrics | awk -v m="$1" '$1==m {print $2}'; }
redis-benchmark -p 7119 -t set -n 20000 -r 100 -q >/dev/null   # the hot keys exist
redis-benchmark -p 7119 -t get -n 20000 -r 100 -q >/dev/null   # and are cached
h0=$(metric cachetier_sidecar_cache_hits_total); m0=$(metric cachetier_sidecar_cache_misses_total)
redis-benchmark -p 7119 -t get -n ${GETS:-400000} -r 100 -c 20 -q > "$WORK/get.txt" &
G=$!
if [ "${WRITES:-1}" = 1 ]; then
  redis-benchmark -p 7119 -t set -n ${SETS:-200000} -r 100000000 -c 20 -q > "$WORK/set.txt" &
  S=$!
  wait $S
fi
wait $G
h1=$(metric cachetier_sidecar_cache_hits_total); m1=$(metric cachetier_sidecar_cache_misses_total)
echo "gets: $(tr '\r' '\n' < "$WORK/get.txt" | grep -a 'requests per second' | tail -1)"
[ "${WRITES:-1}" = 1 ] && echo "sets: $(tr '\r' '\n' < "$WORK/set.txt" | grep -a 'requests per second' | tail -1)"
echo "hits=$((h1-h0)) misses=$((m1-m0))" | awk -F'[ =]' '{printf "%s %s hit rate %.4f\n", $0, "", $2/($2+$4)}'
