#!/usr/bin/env bash
# Installs what cachetier needs at run and test time when it is missing:
# redis-server and redis-cli (Debian's Redis 7). Idempotent; prints what it does.
# Rust itself is not installed here: a missing cargo gets a clear message.
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
for extra in "$@"; do
    case "$extra" in
        nutcracker) command -v nutcracker >/dev/null 2>&1 || need_apt+=(nutcracker) ;;
        *) echo "ensure-deps: unknown extra '$extra'" >&2; exit 2 ;;
    esac
done

if ((${#need_apt[@]})); then
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "ensure-deps: missing ${need_apt[*]}; install them as root: apt-get install -y ${need_apt[*]}" >&2
            exit 1
        fi
    fi
    echo "ensure-deps: installing ${need_apt[*]} (apt-get)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "ensure-deps: cargo not found. Install Rust 1.89 or newer with rustup (https://rustup.rs), then run this again." >&2
    exit 1
fi

# Debian's package starts a system redis-server on 6379 where systemd runs; the
# local tier's sidecar wants that port, and tests never use it. Say so once.
if command -v ss >/dev/null 2>&1 && ss -ltn 2>/dev/null | grep -q '127.0.0.1:6379 '; then
    echo "ensure-deps: note: something already listens on 127.0.0.1:6379 (a system redis-server?)." >&2
fi
redis-server --version | sed 's/^/ensure-deps: /'
