#!/usr/bin/env bash
# The test suite: installs what the tests need (redis-server, redis-cli), then
# runs every test of the workspace against real redis-server processes.
# Tests that need a Kubernetes cluster run only when KUBECONFIG is set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
if [[ -z "${KUBECONFIG:-}" ]]; then
    echo "test: KUBECONFIG is not set: the Kubernetes end-to-end tests (e2e/tests/kubernetes.rs) will be SKIPPED"
fi
exec cargo test --workspace --locked "$@"
