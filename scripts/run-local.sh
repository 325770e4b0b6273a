#!/usr/bin/env bash
# Runs a local CacheTier (redis-server processes on 127.0.0.1) with the sidecar
# in front: installs redis-server when missing, then starts local mode with the
# manifest given (default: crds/examples/minimal.yaml). Extra arguments go to
# `cachetier-operator local` (e.g. --sidecar-port 6380, --base-port 7100).
# Connect with `redis-cli -p 6379`; Ctrl-C stops everything and removes its data.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
manifest="${1:-crds/examples/minimal.yaml}"
echo "run-local: building (the first build takes several minutes)"
cargo build -q --locked -p cachetier-operator
# exec the binary itself (not `cargo run`), so a SIGTERM to this script reaches
# local mode and it stops every node it started.
target_dir=$(cargo metadata -q --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
exec "$target_dir/debug/cachetier-operator" local -f "$manifest" "${@:2}"
