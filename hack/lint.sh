#!/usr/bin/env bash
# gofmt and go vet over every tracked Go file of the product module.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=$({ git ls-files '*.go'; git ls-files --others --exclude-standard '*.go'; } | grep -v '^hack/tools/' | xargs -r gofmt -l)
if [[ -n "$bad" ]]; then
  echo "lint: gofmt would change:" >&2
  echo "$bad" >&2
  exit 1
fi
go vet ./...
echo "lint: gofmt and go vet clean"
