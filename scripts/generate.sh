#!/usr/bin/env bash
# Regenerates every generated file from the Rust sources:
#   crds/cachetier.yaml  <- cargo run -p cachetier-operator -- crd
# With --check, changes nothing and fails if a checked-in file is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo run -q --locked -p cachetier-operator -- crd > "$tmp/cachetier.yaml"
if [[ "${1:-}" == "--check" ]]; then
    if ! diff -u crds/cachetier.yaml "$tmp/cachetier.yaml"; then
        echo "crds/cachetier.yaml is stale: run scripts/generate.sh and commit the result" >&2
        exit 1
    fi
    echo "generated files are up to date"
else
    cp "$tmp/cachetier.yaml" crds/cachetier.yaml
    echo "wrote crds/cachetier.yaml"
fi
