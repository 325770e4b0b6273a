#!/usr/bin/env bash
# Checks the Helm chart the way CI does: helm lint and helm template with the
# default values and with every option on (charts/cachetier/ci/full-values.yaml),
# every rendered object through kubernetes-validate --strict, the alert rules
# through promtool, and the operator (built with cargo, as generate.sh builds
# it) with the arguments the chart renders. Installs helm/kubectl/kubernetes-validate when missing
# (scripts/ensure-k8s-tools.sh) and promtool from Debian's prometheus package.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/ensure-k8s-tools.sh)
export PATH="$bin:$PATH"
if ! command -v promtool >/dev/null 2>&1; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "check-chart: installing promtool (apt-get install prometheus)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
chart=charts/cachetier
helm lint --strict "$chart"
helm lint --strict "$chart" -f "$chart/ci/full-values.yaml"
helm template cachetier "$chart" -n cachetier-system > "$out/default.yaml"
helm template cachetier "$chart" -n cachetier-system -f "$chart/ci/full-values.yaml" > "$out/full.yaml"
kubernetes-validate --strict -k 1.33.0 "$out/default.yaml" "$out/full.yaml"
# The operator accepts every argument the chart gives it (clap checks them
# all before it answers --help).
python3 - "$out/default.yaml" "$out/full.yaml" <<'PY'
import subprocess, sys, yaml
for f in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(f)):
        if not doc or doc.get("kind") != "Deployment":
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c["name"] != "operator":
                continue
            cmd = ["cargo", "run", "-q", "--locked", "-p", "cachetier-operator", "--", *c["args"], "--help"]
            run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if run.returncode != 0:
                sys.exit(f"check-chart: the operator refuses the chart's arguments ({f}): {run.stderr}")
PY
# Wrong values are refused by values.schema.json, with the field's name.
if helm template cachetier "$chart" --set operator.replicas=0 > /dev/null 2> "$out/err"; then
    echo "check-chart: operator.replicas=0 was accepted" >&2
    exit 1
fi
grep -q "operator/replicas" "$out/err"
# The alert rules as Prometheus reads them.
python3 - "$out/full.yaml" "$out/rules.yaml" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "PrometheusRule":
        yaml.safe_dump(doc["spec"], open(sys.argv[2], "w"))
        break
else:
    sys.exit("no PrometheusRule rendered with the full values")
PY
promtool check rules "$out/rules.yaml"
echo "check-chart: ok"
