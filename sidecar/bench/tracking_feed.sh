#!/usr/bin/env bash
# What the CLIENT TRACKING invalidation feeds cost per write. While at least
# one client tracks, the sidecar keeps one `CLIENT TRACKING on BCAST` feed
# (every key) per primary, so every write to the tier comes back to it as a
# push, which it filters for each tracking client (src/tracking.rs,
# src/client_cache/). This script loads a 3-primary cluster (no replicas)
# through the release sidecar with a fixed number of SETs
#   redis-benchmark -t set -P 16 -r 100000 -c 4
# in four cases:
#   a  no tracking client (no feed running: checked on the primaries);
#   b  1 tracking client: RESP3 (`HELLO 3`), `CLIENT TRACKING ON`, then GET of
#      1000 of the keys the load writes (key:<12 digits>, every 100th of
#      redis-benchmark's 100 000), so it is sent an `invalidate` for each of
#      them the load writes (about 18 % of them at 20 000 SETs);
#   c  CLIENTS (default 10) such clients, each with its own 1000 keys;
#   d  1 BCAST client (`CLIENT TRACKING ON BCAST PREFIX key:`): every write
#      is a key pushed to it.
# The tracking clients are a small stdlib python3 script (written to the temp
# dir) that keeps reading its socket and counts the pushes and the keys they
# name; the counts for the measured load are printed, with the sidecar's
# `cachetier_sidecar_tracking_pushes_total` and `..._flushes_total` deltas, so
# a case where nothing was pushed shows as such.
#
# Two passes, one sidecar process each, cases in the order a b c d:
#   1. callgrind: the sidecar under `valgrind --tool=callgrind`; its whole
#      process's instructions (every thread, background timers included) over
#      N SETs, divided by N, as instructions.sh counts them;
#   2. CPU: the sidecar alone; utime+stime from /proc/<pid>/stat (10 ms ticks)
#      of the sidecar and of the 3 redis-servers around N_CPU SETs, per 100k
#      SETs, and redis-benchmark's SET/s; ROUNDS rounds of a b c d, medians.
# Ratios to case (a) and sidecar/Redis come from the same run.
#
# Usage (from the repository root):
#   cargo build --release -p cachetier-sidecar
#   sidecar/bench/tracking_feed.sh [N] [N_CPU] [ROUNDS]
#       # defaults: N=20000 (callgrind), N_CPU=200000, ROUNDS=3; CLIENTS=10;
#       # CALLGRIND=0 skips pass 1; CG_OUT=DIR keeps each case's callgrind
#       # dump there (DIR/cg.CASE) for callgrind_annotate
#
# Needs redis-server, redis-cli, redis-benchmark (Redis 7), python3, curl,
# valgrind (callgrind_control). Uses ports 26001-26003 (Redis), 26101-26103
# (their cluster bus), 26010-26011 and 26020-26021 (sidecars) on 127.0.0.1
# and a temp dir; stops only the processes it started (by saved PID).
# Every wait is bounded; a default run takes about 3 minutes here (4 with
# ROUNDS=5).
set -euo pipefail

N=${1:-20000}
N_CPU=${2:-200000}
ROUNDS=${3:-3}
CLIENTS=${CLIENTS:-10}
CALLGRIND=${CALLGRIND:-1}
WORK_PREFIX=cachetier-tracking
# shellcheck source=sidecar/bench/lib.sh
. "$(dirname "$0")/lib.sh"
need_sidecar

PRIMARIES=(26001 26002 26003)
HZ=$(getconf CLK_TCK)
LOAD=(-t set -P 16 -r 100000 -c 4)
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "sidecar binary: $BIN; code at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# --- The tracking client -------------------------------------------------
# tracker.py PORT MODE FIRST STEP COUNT OUT: MODE `keys` GETs COUNT keys
# key:%012d from FIRST by STEP after CLIENT TRACKING ON; `bcast` turns on
# BCAST PREFIX key: instead. Writes `ready` to OUT once set up; SIGUSR1
# zeroes its counts (writes `reset`); SIGTERM writes the counts and exits.
cat > "$WORK/tracker.py" <<'PY'
import signal, socket, sys

port, mode, first, step, count, out = sys.argv[1:7]
first, step, count = int(first), int(step), int(count)

class Incomplete(Exception):
    pass

class Push(list):
    pass

def parse(buf, i):
    j = buf.find(b"\r\n", i)
    if j < 0:
        raise Incomplete
    t, line, i = buf[i:i + 1], bytes(buf[i + 1:j]), j + 2
    if t in (b"+", b":", b",", b"#", b"("):
        return line, i
    if t == b"-":
        raise SystemExit("error reply: %r" % line)
    if t == b"_":
        return None, i
    if t in (b"$", b"=", b"!"):
        n = int(line)
        if n < 0:
            return None, i
        if len(buf) < i + n + 2:
            raise Incomplete
        return bytes(buf[i:i + n]), i + n + 2
    if t in (b"*", b"~", b">", b"%", b"|"):
        n = int(line)
        if n < 0:
            return None, i
        if t in (b"%", b"|"):
            n *= 2
        items = Push() if t == b">" else []
        for _ in range(n):
            v, i = parse(buf, i)
            items.append(v)
        if t == b"|":  # an attribute: the value follows it
            return parse(buf, i)
        return items, i
    raise SystemExit("unknown RESP type %r" % t)

def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out

signal.alarm(1800)  # bounded: gone after 30 minutes whatever happens
sock = socket.create_connection(("127.0.0.1", int(port)))
buf, pos = bytearray(), 0
counts = {"pushes": 0, "keys": 0, "nulls": 0, "bytes": 0}
stop = False

def frame():
    """The next frame, reading as needed; pushes are counted and skipped."""
    global buf, pos
    while True:
        try:
            v, n = parse(buf, pos)
        except Incomplete:
            if pos > 1 << 20:
                del buf[:pos]
                pos = 0
            try:
                data = sock.recv(1 << 16)
            except socket.timeout:
                if stop:
                    return None
                continue
            if not data:
                raise SystemExit("connection closed")
            counts["bytes"] += len(data)
            buf += data
            continue
        pos = n
        if isinstance(v, Push):
            if v and v[0] == b"invalidate":
                if len(v) < 2 or v[1] is None:
                    counts["nulls"] += 1
                else:
                    counts["pushes"] += 1
                    counts["keys"] += len(v[1])
            continue
        return v

def write(line):
    with open(out, "a") as f:
        f.write(line + "\n")

def on_usr1(*_):
    for k in counts:
        counts[k] = 0
    write("reset")

def on_term(*_):
    global stop
    stop = True

sock.sendall(cmd("HELLO", "3"))
frame()
if mode == "bcast":
    sock.sendall(cmd("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "key:"))
else:
    sock.sendall(cmd("CLIENT", "TRACKING", "ON"))
if frame() != b"OK":
    raise SystemExit("CLIENT TRACKING ON not OK")
if mode == "keys":
    sock.sendall(b"".join(cmd("GET", "key:%012d" % (first + k * step)) for k in range(count)))
    for _ in range(count):
        frame()
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, on_term)
sock.settimeout(0.2)
write("ready")
while not stop:
    frame()
write("counts pushes=%(pushes)d keys=%(keys)d nulls=%(nulls)d bytes=%(bytes)d" % counts)
PY

# --- Helpers ----------------------------------------------------------------
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; } # utime+stime
redis_ticks() { local s=0 p; for p in "${REDIS_PIDS[@]}"; do s=$((s + $(ticks "$p"))); done; echo "$s"; }
per_100k_ms() { awk -v t="$1" -v hz="$HZ" -v n="$2" 'BEGIN { printf "%.1f", t * 1000 / hz / n * 100000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
distinct() { echo "$1" | tr ' ' '\n' | grep . | sort -un | paste -sd, -; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
metric() { # METRICS_PORT NAME: the sum of that metric's series
  curl -s --max-time 10 "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}
# Tracking connections on the primaries (flag t): the sidecar's feeds.
feeds() { local s=0 p; for p in "${PRIMARIES[@]}"; do s=$((s + $(redis-cli -p "$p" client list | grep -c 'flags=[^ ]*t' || true))); done; echo "$s"; }
wait_line() { # FILE LINE PID: until FILE has LINE (60 s at most)
  for _ in $(seq 600); do
    grep -qx "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "tracker $3 exited: $(cat "$1" 2>/dev/null)" >&2; exit 1; }
    sleep 0.1
  done
  echo "tracker $3: no '$2' in 60 s" >&2
  exit 1
}

# start_trackers CASE PORT: the case's tracking clients, set up, in TRACKERS
TRACKERS=()
SEQ=0
start_trackers() {
  TRACKERS=()
  local specs=() s mode off port=$2
  case $1 in
    a) ;;
    b) specs=("keys 0") ;;
    c) for j in $(seq 0 $((CLIENTS - 1))); do specs+=("keys $j"); done ;;
    d) specs=("bcast 0") ;;
  esac
  for s in "${specs[@]}"; do
    read -r mode off <<<"$s"
    SEQ=$((SEQ + 1))
    python3 "$WORK/tracker.py" "$port" "$mode" "$off" 100 1000 "$WORK/trk.$SEQ" 2>>"$WORK/trk.err" &
    PIDS+=($!)
    TRACKERS+=("$!:$WORK/trk.$SEQ")
  done
  for s in "${TRACKERS[@]}"; do wait_line "${s#*:}" ready "${s%%:*}"; done
}
reset_trackers() { # zero their counts, so they count the measured load only
  local s
  for s in "${TRACKERS[@]}"; do kill -USR1 "${s%%:*}"; done
  for s in "${TRACKERS[@]}"; do wait_line "${s#*:}" reset "${s%%:*}"; done
}
# stop_trackers: SIGTERM; PUSHES, KEYS, NULLS summed, MINP the fewest
# pushes+nulls one client got
stop_trackers() {
  local s p f line
  PUSHES=0 KEYS=0 NULLS=0 MINP=
  for s in "${TRACKERS[@]}"; do kill -TERM "${s%%:*}" 2>/dev/null || true; done
  for s in "${TRACKERS[@]}"; do
    p=${s%%:*} f=${s#*:}
    wait "$p" || true
    line=$(grep '^counts' "$f" | tail -1)
    [ -n "$line" ] || { echo "tracker $p printed no counts: $(cat "$f")" >&2; exit 1; }
    eval "local ${line#counts }" # pushes= keys= nulls= bytes=
    PUSHES=$((PUSHES + pushes)) KEYS=$((KEYS + keys)) NULLS=$((NULLS + nulls))
    [ -z "$MINP" ] || [ $((pushes + nulls)) -lt "$MINP" ] && MINP=$((pushes + nulls))
  done
  TRACKERS=()
  MINP=${MINP:-0}
}
# check_pushes CASE: says so when a case with tracking clients got no pushes
check_pushes() {
  if [ "$1" != a ] && [ "$MINP" -eq 0 ]; then
    echo "WARNING: case $1: a tracking client received no push" >&2
  fi
}
warm() { # PORT: a few SETs of one key (not one the clients track), untimed
  timeout 600 redis-benchmark -h 127.0.0.1 -p "$1" -t set -P 16 -c 4 -n 2000 -q >/dev/null 2>&1
}
rps() { tr '\r' '\n' < "$1" | grep -a 'requests per second' | tail -1 | awk '{ print $2 }'; }

declare -A IR FEEDS_CG PUSH_CG KEYS_CG NULL_CG SPUSH_CG FLUSH_CG
declare -A SC_T RD_T RPS FEEDS_CPU PUSH_CPU KEYS_CPU NULL_CPU FLUSH_CPU
CASES=(a b c d)
desc() {
  case $1 in
    a) echo "no tracking client" ;;
    b) echo "1 tracking client, 1000 keys" ;;
    c) echo "$CLIENTS tracking clients, 1000 keys each" ;;
    d) echo "1 BCAST client, PREFIX key:" ;;
  esac
}

# --- The cluster: 3 primaries, no replicas -----------------------------------
REDIS_PIDS=()
for p in "${PRIMARIES[@]}"; do
  mkdir -p "$WORK/redis-$p"
  redis-server --bind 127.0.0.1 --port "$p" --cluster-enabled yes --cluster-port $((p + 100)) \
    --cluster-config-file nodes.conf --dir "$WORK/redis-$p" --save '' --appendonly no \
    --logfile redis.log --daemonize no >/dev/null 2>&1 &
  REDIS_PIDS+=($!); PIDS+=($!)
done
for p in "${PRIMARIES[@]}"; do wait_ping "$p"; done
timeout 60 redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PRIMARIES[@]}") --cluster-yes >/dev/null
for p in "${PRIMARIES[@]}"; do
  for _ in $(seq 600); do redis-cli -p "$p" cluster info | grep -q cluster_state:ok && break; sleep 0.1; done
  redis-cli -p "$p" cluster info | grep -q cluster_state:ok || { echo "cluster not ok on $p" >&2; exit 1; }
done
sleep 1

# --- Pass 1: instructions per SET under callgrind -----------------------------
if [ "$CALLGRIND" = 1 ]; then
  echo "pass 1: callgrind, $N SETs per case"
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" \
    "$BIN" --listen 127.0.0.1:26010 --seed 127.0.0.1:"${PRIMARIES[0]}" --metrics 127.0.0.1:26011 \
    >"$WORK/sidecar-cg.log" 2>&1 &
  S=$!; PIDS+=($S)
  wait_ping 26010
  # Connections to every primary, metric series: before any case.
  timeout 600 redis-benchmark -h 127.0.0.1 -p 26010 "${LOAD[@]}" -n 4000 -q >/dev/null 2>&1
  for c in "${CASES[@]}"; do
    start_trackers "$c" 26010
    warm 26010
    sleep 2 # pushes of the warm-up delivered (the sidecar is slow under callgrind)
    FEEDS_CG[$c]=$(feeds)
    reset_trackers
    p0=$(metric 26011 cachetier_sidecar_tracking_pushes_total)
    f0=$(metric 26011 cachetier_sidecar_tracking_flushes_total)
    callgrind_control -z "$S" >/dev/null 2>&1
    timeout 900 redis-benchmark -h 127.0.0.1 -p 26010 "${LOAD[@]}" -n "$N" -q >"$WORK/cg-$c.out" 2>&1
    sleep 2 # the load's last pushes reach the clients
    rm -f "$WORK"/cg."$S".*
    callgrind_control -d "$S" >/dev/null 2>&1
    for _ in $(seq 100); do ls "$WORK"/cg."$S".* >/dev/null 2>&1 && break; sleep 0.1; done
    sleep 0.5
    ir=$(cat "$WORK"/cg."$S".* | awk '/^summary:/ { s += $2 } END { print s + 0 }')
    [ "$ir" -gt 0 ] || { echo "no callgrind dump for case $c" >&2; exit 1; }
    IR[$c]=$ir
    [ -z "${CG_OUT:-}" ] || { mkdir -p "$CG_OUT"; cat "$WORK"/cg."$S".* > "$CG_OUT/cg.$c"; }
    SPUSH_CG[$c]=$(( $(metric 26011 cachetier_sidecar_tracking_pushes_total) - p0 ))
    FLUSH_CG[$c]=$(( $(metric 26011 cachetier_sidecar_tracking_flushes_total) - f0 ))
    stop_trackers
    PUSH_CG[$c]=$PUSHES KEYS_CG[$c]=$KEYS NULL_CG[$c]=$NULLS
    check_pushes "$c"
    printf '  %s %-40s feeds %s  %6d Ir/SET  client pushes %d (keys %d, null %d), sidecar pushes %d, flushes %d\n' \
      "$c" "$(desc "$c")" "${FEEDS_CG[$c]}" $((ir / N)) "$PUSHES" "$KEYS" "$NULLS" "${SPUSH_CG[$c]}" "${FLUSH_CG[$c]}"
    sleep 0.5 # the feeds stop (checked every 200 ms) before the next case
  done
  kill "$S" 2>/dev/null || true
  wait "$S" 2>/dev/null || true
fi

# --- Pass 2: CPU time per 100k SETs, sidecar and Redis ------------------------
echo "pass 2: CPU time, $N_CPU SETs per case, $ROUNDS rounds"
start_sidecar sidecar-cpu.log 26020 "${PRIMARIES[0]}" 26021
SC=$STARTED
wait_ping 26020
timeout 600 redis-benchmark -h 127.0.0.1 -p 26020 "${LOAD[@]}" -n 20000 -q >/dev/null 2>&1
for r in $(seq "$ROUNDS"); do
  for c in "${CASES[@]}"; do
    start_trackers "$c" 26020
    warm 26020
    sleep 0.5
    FEEDS_CPU[$c]="${FEEDS_CPU[$c]:-} $(feeds)"
    reset_trackers
    f0=$(metric 26021 cachetier_sidecar_tracking_flushes_total)
    s0=$(ticks "$SC"); r0=$(redis_ticks)
    timeout 900 redis-benchmark -h 127.0.0.1 -p 26020 "${LOAD[@]}" -n "$N_CPU" -q >"$WORK/cpu-$c.out" 2>&1
    sleep 0.5 # the load's last pushes reach the clients
    s1=$(ticks "$SC"); r1=$(redis_ticks)
    stop_trackers
    check_pushes "$c"
    fl=$(( $(metric 26021 cachetier_sidecar_tracking_flushes_total) - f0 ))
    SC_T[$c]="${SC_T[$c]:-} $((s1 - s0))" RD_T[$c]="${RD_T[$c]:-} $((r1 - r0))"
    RPS[$c]="${RPS[$c]:-} $(rps "$WORK/cpu-$c.out")"
    PUSH_CPU[$c]="${PUSH_CPU[$c]:-} $PUSHES" KEYS_CPU[$c]="${KEYS_CPU[$c]:-} $KEYS"
    NULL_CPU[$c]="${NULL_CPU[$c]:-} $NULLS" FLUSH_CPU[$c]="${FLUSH_CPU[$c]:-} $fl"
    printf '  round %d %s: sidecar %s ms/100k, redis %s ms/100k, %s SET/s, client pushes %d (keys %d, null %d), flushes %d\n' \
      "$r" "$c" "$(per_100k_ms $((s1 - s0)) "$N_CPU")" "$(per_100k_ms $((r1 - r0)) "$N_CPU")" \
      "$(rps "$WORK/cpu-$c.out")" "$PUSHES" "$KEYS" "$NULLS" "$fl"
    sleep 0.5
  done
done

# --- The table ---------------------------------------------------------------
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "callgrind: $N SETs per case; CPU: $N_CPU SETs per case, medians of $ROUNDS rounds"
echo "(pushes: invalidate pushes the tracking clients received during the measured load, summed"
echo " over them, callgrind pass / median of the CPU pass; keys: keys those pushes named)"
echo
echo "| case | feeds | pushes (keys) | sidecar Ir/SET | vs (a) | Ir/SET − (a) | sidecar CPU ms/100k SETs | vs (a) | Redis CPU ms/100k SETs (3 primaries) | vs (a) | sidecar / Redis | SET/s | vs (a) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
sa=$(echo "${SC_T[a]}" | median); ra=$(echo "${RD_T[a]}" | median); qa=$(echo "${RPS[a]}" | median)
for c in "${CASES[@]}"; do
  st=$(echo "${SC_T[$c]}" | median); rt=$(echo "${RD_T[$c]}" | median); q=$(echo "${RPS[$c]}" | median)
  pc=$(echo "${PUSH_CPU[$c]}" | median); kc=$(echo "${KEYS_CPU[$c]}" | median)
  if [ "$CALLGRIND" = 1 ]; then
    irs=$((IR[$c] / N)); irr=$(ratio "${IR[$c]}" "${IR[a]}")
    per=$(((IR[$c] - IR[a]) / N))
    pushes="${PUSH_CG[$c]} (${KEYS_CG[$c]}) / $pc ($kc)"
    feeds="${FEEDS_CG[$c]} / $(distinct "${FEEDS_CPU[$c]}")"
  else
    irs=– irr=– per=– pushes="$pc ($kc)" feeds=$(distinct "${FEEDS_CPU[$c]}")
  fi
  printf '| %s: %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.0f | %s |\n' \
    "$c" "$(desc "$c")" "$feeds" "$pushes" "$irs" "$irr" "$per" \
    "$(per_100k_ms "$st" "$N_CPU")" "$(ratio "$st" "$sa")" \
    "$(per_100k_ms "$rt" "$N_CPU")" "$(ratio "$rt" "$ra")" "$(ratio "$st" "$rt")" \
    "$q" "$(ratio "$q" "$qa")"
done
echo
echo "CPU pass per round (ticks of 1/$HZ s; sidecar | redis | SET/s | flushes):"
for c in "${CASES[@]}"; do
  echo "  $c: sidecar${SC_T[$c]} | redis${RD_T[$c]} | SET/s${RPS[$c]} | flushes${FLUSH_CPU[$c]} | null pushes${NULL_CPU[$c]}"
done
if [ "$CALLGRIND" = 1 ]; then
  # Marginal costs: d and b both run the feeds for one client; d is pushed
  # every key. c and b differ by CLIENTS - 1 clients filtering every write.
  [ "${KEYS_CG[d]}" -gt "${KEYS_CG[b]}" ] && echo "callgrind, (d − b) per extra key pushed: $(((IR[d] - IR[b]) / (KEYS_CG[d] - KEYS_CG[b]))) Ir; per extra push: $(((IR[d] - IR[b]) / (PUSH_CG[d] - PUSH_CG[b]))) Ir"
  [ "$CLIENTS" -gt 1 ] && echo "callgrind, (c − b) per SET per extra tracking client: $(((IR[c] - IR[b]) / N / (CLIENTS - 1))) Ir"
  echo "callgrind pass: sidecar pushes sent / flushes: $(for c in "${CASES[@]}"; do printf '%s %s/%s  ' "$c" "${SPUSH_CG[$c]}" "${FLUSH_CG[$c]}"; done)"
fi
echo
echo "sidecar log lines with WARN or ERROR:"
grep -ahiE 'warn|error' "$WORK"/sidecar-*.log | head -20 || echo "  none"
[ -s "$WORK/trk.err" ] && { echo "tracking client stderr:"; head -20 "$WORK/trk.err"; }
exit 0
