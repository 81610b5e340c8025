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
// it cannot rot: every mode the build has runs, the apiserver's figures are
// read, the clients of both nodes see what changed during the outage, and
// the report is written.
func TestFleetSanity(t *testing.T) {
	cfg := Config{Nodes: 2, Steady: 4 * time.Second, Outage: 4 * time.Second, After: 3 * time.Second,
		Sample: time.Second, Churn: 4, Namespaces: 2, Services: 3, PodsPerNode: 1, Out: t.TempDir()}
	rep := Run(t, cp, cfg)
	if t.Failed() {
		return
	}
	want := watchesPerNode(cfg.PodsPerNode) * cfg.Nodes
	for _, r := range rep.Runs {
		if r.Missing != "" {
			if r.Mode != Shared || r.Missing != notInBuild {
				t.Errorf("%s did not run: %s", r.Mode, r.Missing)
			}
			continue
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
		// Churn reaches every client as watch events, and outpost probes
		// the apiserver: the counters move in every mode.
		if r.Steady.Bytes <= 0 || r.Steady.CPU <= 0 || r.Reconnect.Bytes <= 0 || (r.Mode != Direct && r.Steady.Requests <= 0) {
			t.Errorf("%s: steady %+v, reconnect %+v: the apiserver's counters did not move", r.Mode, r.Steady, r.Reconnect)
		}
		if r.Steady.P99 <= 0 {
			t.Errorf("%s: no latency read in steady state", r.Mode)
		}
	}
	for _, f := range []string{"fleet.md", "samples.csv", "fleet.png", "fleet.svg"} {
		if st, err := os.Stat(cfg.Out + "/" + f); err != nil || st.Size() == 0 {
			t.Errorf("report file %s: %v", f, err)
		}
	}
	for _, m := range []string{Direct, Outpost} {
		if !strings.Contains(rep.Table, "| "+m) && !strings.Contains(rep.Table, " "+m+" |") {
			t.Errorf("the table has no column %s:\n%s", m, rep.Table)
		}
	}
}
