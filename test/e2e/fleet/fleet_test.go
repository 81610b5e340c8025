package fleet

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.Options{}, &cp))
}

// TestFleet is the benchmark itself; `make fleet` runs it with FLEET_RUN=1.
func TestFleet(t *testing.T) {
	if os.Getenv("FLEET_RUN") != "1" {
		t.Skip("the fleet benchmark runs with FLEET_RUN=1 (make fleet)")
	}
	cfg, err := ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	Run(t, cp, cfg)
}

// TestFleetSanity runs the harness on two nodes for a few seconds, so that
// it cannot rot: every mode runs, the apiserver's figures are read, the
// clients of both nodes see what changed during the outage, and the report
// is written. In shared mode the node's informers are answered from the
// watch cache's streams, which the apiserver sees as fewer watches, and
// every caller passed an access review made with its own credentials.
func TestFleetSanity(t *testing.T) {
	cfg := Config{Nodes: 2, Steady: 4 * time.Second, Outage: 4 * time.Second, After: 3 * time.Second,
		Sample: time.Second, Churn: 4, Namespaces: 2, Services: 3, PodsPerNode: 1, Out: t.TempDir()}
	rep := Run(t, cp, cfg)
	if t.Failed() {
		return
	}
	want := watchesPerNode(cfg.PodsPerNode) * cfg.Nodes
	watches := map[string]float64{}
	for _, r := range rep.Runs {
		if r.Missing != "" {
			t.Errorf("%s did not run: %s", r.Mode, r.Missing)
			continue
		}
		watches[r.Mode] = r.Steady.Watchers - r.Baseline.Watchers
		if r.Mode != Direct {
			checkOutposts(t, r, cfg)
		}
		if r.NotConverged != "" {
			t.Errorf("%s: %s", r.Mode, r.NotConverged)
		}
		if len(r.Samples) < 5 {
			t.Errorf("%s: %d samples of the apiserver's metrics, want one a second", r.Mode, len(r.Samples))
		}
		fleet := r.Steady.Watchers - r.Baseline.Watchers
		if r.Mode == Direct && (fleet < float64(want) || fleet > float64(want)+2) {
			// Each informer holds one watch, plus at most a watch of
			// the apiserver's own that came or went meanwhile.
			t.Errorf("direct: %v watches of the fleet registered in the apiserver, want the %d informers' %d", fleet, cfg.Nodes, want)
		}
		if r.Mode != Direct && fleet < 1 {
			t.Errorf("%s: %v watches of the fleet registered in the apiserver, want some", r.Mode, fleet)
		}
		// Churn reaches every client as watch events: the counters move in
		// every mode. (Outposts may send no request at all in a short
		// steady window: between their /readyz probes, one per
		// --probe-ready-interval, they ping.)
		if r.Steady.Bytes <= 0 || r.Steady.CPU <= 0 || r.Reconnect.Bytes <= 0 {
			t.Errorf("%s: steady %+v, reconnect %+v: the apiserver's counters did not move", r.Mode, r.Steady, r.Reconnect)
		}
		if r.Steady.P99 <= 0 {
			t.Errorf("%s: no latency read in steady state", r.Mode)
		}
	}
	// Each node's informers of one scope share one upstream watch: with
	// one pod a node has 16 informers in 8 scopes, 6 of them asked by more
	// than one agent.
	if d, s := watches[Direct], watches[Shared]; s <= 0 || s >= d {
		t.Errorf("shared: %v watches of the fleet registered in the apiserver, want fewer than direct's %v", s, d)
	}
	for _, f := range []string{"fleet.md", "samples.csv", "fleet.png", "fleet.svg"} {
		if st, err := os.Stat(cfg.Out + "/" + f); err != nil || st.Size() == 0 {
			t.Errorf("report file %s: %v", f, err)
		}
	}
	for _, m := range AllModes {
		if !strings.Contains(rep.Table, "| "+m) && !strings.Contains(rep.Table, " "+m+" |") {
			t.Errorf("the table has no column %s:\n%s", m, rep.Table)
		}
	}
}

// checkOutposts checks an outpost mode's own figures: with the watch cache,
// every node's informers are watches served from its streams, each caller
// admitted by an access review that said yes; without it, none.
func checkOutposts(t *testing.T, r *modeRun, cfg Config) {
	t.Helper()
	w := r.OutpostSteady
	if w.Nodes != cfg.Nodes {
		t.Errorf("%s: %d of %d outposts' metrics read", r.Mode, w.Nodes, cfg.Nodes)
		return
	}
	fromStreams := r.OutpostStart.Answered["watch-cache"]
	if r.Mode == Outpost {
		if w.Streams[1] != 0 || w.Watchers[1] != 0 || fromStreams != 0 {
			t.Errorf("outpost: %v streams, %v watches and %v answers from them without %s", w.Streams[1], w.Watchers[1], fromStreams, WatchCacheFlag)
		}
		return
	}
	if fromStreams < w.Watchers[0] {
		t.Errorf("shared: %v answers from the watch cache at the start, want at least a node's %v watches", fromStreams, w.Watchers[0])
	}
	// Not every informer's: which scopes a stream may answer is the watch
	// cache's business, not the harness's.
	per := float64(watchesPerNode(cfg.PodsPerNode))
	if w.Watchers[0] < 2 || w.Watchers[1] > per || w.Streams[0] < 1 || w.Streams[0] >= w.Watchers[0] {
		t.Errorf("shared: per node %v local watches from %v streams (median), want some of the %v informers' from fewer streams", w.Watchers[0], w.Streams[0], per)
	}
	denied := r.OutpostSteady.Reviews["denied"] + r.OutpostSteady.Reviews["error"]
	if denied != 0 || r.Start.Reviews < 1 {
		t.Errorf("shared: %v access reviews denied or failed in steady state, %v made from the start", denied, r.Start.Reviews)
	}
}
