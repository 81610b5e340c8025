// Package fleet is the fleet benchmark (`make fleet`, issue #16): N nodes,
// each with the clients of a realistic node made of client-go informers,
// against one real kube-apiserver, in several modes compared in one run —
// the clients direct to the apiserver, through an outpost per node, and
// through an outpost with the node watch cache (--watch-cache) when the
// built outpost has it. Every node's link (its outpost's, or in direct mode
// its clients') passes through a framework FaultProxy, so that one outage
// cuts the whole fleet at once and its restore brings it all back together,
// as after a regional outage.
//
// It exists to measure what the cloud side pays for a fleet: the upstream
// watches each node holds, the requests, bytes and CPU of the steady state,
// and above all the reconnect after an outage longer than the apiserver's
// watch-cache window, read from the apiserver's own /metrics. Its output is
// a markdown table, the samples and a picture in _output/fleet.
//
// It is a test gated by FLEET_RUN=1 (set by `make fleet`) rather than a
// `go test -bench` benchmark: one run is a fixed scenario of several
// minutes, not an operation to repeat b.N times, and the framework's
// helpers own their processes through testing's cleanups. TestFleetSanity
// runs the same harness on two nodes for a few seconds in `make test`.
package fleet

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// Run seeds the cluster, runs every mode of cfg in order on cp's apiserver
// and writes the report into cfg.Out. A mode whose outpost flag the built
// outpost lacks is reported as notInBuild.
func Run(t *testing.T, cp *framework.ControlPlane, cfg Config) *Report {
	t.Helper()
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Out == "" {
		root, err := framework.RepoRoot()
		if err != nil {
			t.Fatal(err)
		}
		cfg.Out = filepath.Join(root, "_output", "fleet")
	}
	files, err := raiseFileLimit()
	if err != nil {
		t.Log(err)
	}
	t.Logf("open files limit of the harness: %d", files)
	c := seed(t, cp, cfg)
	churnCtx, stopChurn := context.WithCancel(t.Context())
	churned := make(chan error, 1)
	go func() { churned <- c.churn(churnCtx) }()

	rep := &Report{Config: cfg}
	for _, mode := range cfg.Modes {
		r := &modeRun{Mode: mode}
		if mode == Shared {
			has, err := OutpostHasFlag(WatchCacheFlag)
			if err != nil {
				t.Fatal(err)
			}
			if !has {
				r.Missing = notInBuild
				t.Logf("%s: outpost run --help lists no %s: %s", mode, WatchCacheFlag, notInBuild)
				rep.Runs = append(rep.Runs, r)
				continue
			}
		}
		if !t.Run(mode, func(t *testing.T) { r = runMode(t, c, mode) }) {
			r.Missing = "failed (see the log)"
		}
		rep.Runs = append(rep.Runs, r)
		if t.Failed() {
			break
		}
	}
	stopChurn()
	if err := <-churned; err != nil {
		t.Errorf("%v", err)
	}
	if err := rep.write(); err != nil {
		t.Fatalf("writing the report: %v", err)
	}
	t.Logf("report in %s:\n%s", cfg.Out, rep.Table)
	return rep
}
