#!/usr/bin/env bash
# Runs a local CacheTier (redis-server processes on 127.0.0.1) with a sidecar in
# front: installs redis-server when missing, then starts local mode with the
# manifest given (default: crds/examples/minimal.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
manifest="${1:-crds/examples/minimal.yaml}"
if ! cargo run -q -p cachetier-operator -- help local >/dev/null 2>&1; then
    echo "run-local: local mode is not built yet (issue: Cluster core and local mode)." >&2
    exit 2
fi
exec cargo run -q -p cachetier-operator -- local -f "$manifest" "${@:2}"
