# Outpost — the two commands for a fresh machine are `make demo` and `make test`.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo v0.0.0-dev)
LDFLAGS := -s -w -X github.com/outposthq/outpost/internal/version.Version=$(VERSION)
GO_TEST_TIMEOUT ?= 40m

.PHONY: all build images k8s node-deps test unit e2e lint demo bench chaos fleet clean

all: build

## build: outpost and outpost-controller into _output/bin, static (no cgo)
# Static binaries map no libc or dynamic loader: an idle outpost is ~2 MB smaller.
build:
	@mkdir -p _output/bin
	CGO_ENABLED=0 go build -ldflags '$(LDFLAGS)' -o _output/bin/outpost ./cmd/outpost
	CGO_ENABLED=0 go build -ldflags '$(LDFLAGS)' -o _output/bin/outpost-controller ./cmd/outpost-controller

## images: OCI image archives of both programs into _output/images (no container
## engine needed); load with ctr images import, docker load or podman load
images: build
	go run ./hack/images -bin _output/bin -out _output/images -version $(VERSION) -revision "$$(git rev-parse HEAD 2>/dev/null || true)" \
		-created "$$(git log -1 --format=%ct 2>/dev/null || echo 0)"

## k8s: the pinned Kubernetes toolchain into _output/k8s (skipped when current)
k8s:
	hack/k8s.sh

## node-deps: as root, Debian's containerd, runc and CNI plugins for the real-kubelet tests
node-deps:
	@if [ "$$(id -u)" = 0 ]; then hack/install-node-deps.sh; else echo "node-deps: not root; the real-kubelet tests will say they are skipped"; fi

## lint: gofmt, go vet and staticcheck (pinned in hack/tools/staticcheck, built into _output/tools)
lint:
	hack/lint.sh

## test: lint, unit and end-to-end tests on a real local control plane, and the
## alerting rules and dashboard checked with Prometheus' own parsers
test: node-deps k8s build lint
	go test -count=1 -timeout $(GO_TEST_TIMEOUT) ./...
	cd hack/tools/monitoring && go test -count=1 ./...

## unit: tests that need no control plane
unit:
	go test -count=1 $$(go list ./... | grep -v /test/e2e)

## e2e: only the end-to-end suites
e2e: k8s build
	go test -count=1 -timeout $(GO_TEST_TIMEOUT) ./test/e2e/...

## bench: direct vs through outpost, on the real apiserver; report in _output/bench.txt
bench: k8s build
	go test -run '^$$' -bench . -benchtime 2s -count 1 ./test/e2e/bench/ | tee _output/bench.txt

## chaos: a seeded soak of faults (link, kill -9, apiserver restart, full disk, corrupt
## store) against outpost on a real control plane, invariants checked all along;
## CHAOS_DURATION (default 10m), CHAOS_SEED replays a run; report, RSS/fd curve and
## log in _output/chaos
chaos: k8s build
	@mkdir -p _output/chaos
	CHAOS_DURATION=$${CHAOS_DURATION:-10m} CHAOS_OUT=$(CURDIR)/_output/chaos \
		go test -count=1 -timeout $(GO_TEST_TIMEOUT) -v -run '^TestChaos$$' ./test/e2e/chaos/ 2>&1 | tee _output/chaos/chaos.log

## fleet: FLEET_NODES (50) outposts with realistic node clients vs the same clients direct, on one real
## apiserver, through an outage of every link (FLEET_OUTAGE, 120s); table and picture in _output/fleet
fleet: k8s build
	@mkdir -p _output/fleet
	FLEET_RUN=1 go test -count=1 -run '^TestFleet$$' -timeout 2h -v ./test/e2e/fleet/ 2>&1 | tee _output/fleet/run.log

## demo: a real control plane, outpost in front of it, kubectl through outpost
demo: node-deps k8s build
	hack/demo.sh

clean:
	rm -rf _output
