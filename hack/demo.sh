#!/usr/bin/env bash
# make demo: builds what it needs (make k8s build ran first) and runs the
# narrated demo in hack/demo on a real local control plane.
set -euo pipefail
cd "$(dirname "$0")/.."
exec go run ./hack/demo "$@"
