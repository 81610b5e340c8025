#!/usr/bin/env bash
# gofmt, go vet and staticcheck over every tracked Go file of the product
# module. staticcheck is built from the Go module proxy at the version that
# hack/tools/staticcheck pins, into _output/tools; it is rebuilt only when
# that module or the Go version changed.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=$({ git ls-files '*.go'; git ls-files --others --exclude-standard '*.go'; } | grep -v '^hack/tools/' | xargs -r gofmt -l)
if [[ -n "$bad" ]]; then
  echo "lint: gofmt would change:" >&2
  echo "$bad" >&2
  exit 1
fi
go vet ./...

mod=hack/tools/staticcheck
bin=$PWD/_output/tools/staticcheck
want=$({ cat "$mod/go.mod" "$mod/go.sum"; go version; } | sha256sum | cut -c1-16)
if [[ ! -x "$bin" || "$(cat "$bin.stamp" 2>/dev/null)" != "$want" ]]; then
  echo "lint: building staticcheck" >&2
  mkdir -p "$(dirname "$bin")"
  (cd "$mod" && CGO_ENABLED=0 go build -o "$bin.tmp" honnef.co/go/tools/cmd/staticcheck)
  mv "$bin.tmp" "$bin"
  echo "$want" > "$bin.stamp"
fi
"$bin" ./...
echo "lint: gofmt, go vet and staticcheck clean"
