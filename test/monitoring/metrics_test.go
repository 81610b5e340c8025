// Package monitoring_test keeps deploy/monitoring/exported-metrics.txt
// true: the names of every metric outpost and outpost-controller export,
// which the alerting rules and the dashboard may use (the check of those,
// with Prometheus' own parsers, is hack/tools/monitoring).
package monitoring_test

import (
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/outposthq/outpost/internal/cloud/autonomy"
	"github.com/outposthq/outpost/internal/hub"
)

var update = flag.Bool("update", false, "rewrite deploy/monitoring/exported-metrics.txt")

const header = "# The metrics outpost and outpost-controller export (a histogram adds _bucket, _sum, _count),\n" +
	"# besides the go_* and process_* ones of every Go program.\n" +
	"# Kept true by test/monitoring (go test ./test/monitoring -update rewrites it).\n"

func TestExportedMetricsListed(t *testing.T) {
	names := append(hub.MetricNames(), autonomy.MetricNames()...)
	slices.Sort(names)
	names = slices.Compact(names)
	// The Go runtime's and the process's own, which every Go program
	// exports and whose set moves with the Go release, are left out.
	names = slices.DeleteFunc(names, func(n string) bool {
		return strings.HasPrefix(n, "go_") || strings.HasPrefix(n, "process_")
	})
	for _, want := range []string{"outpost_online", "outpost_cache_views", "outpost_journal_depth", "outpost_controller_leader"} {
		if !slices.Contains(names, want) {
			t.Errorf("%s is not among the exported metrics %v", want, names)
		}
	}
	want := header + strings.Join(names, "\n") + "\n"
	path := filepath.Join("..", "..", "deploy", "monitoring", "exported-metrics.txt")
	if *update {
		if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Errorf("%s is out of date; run go test ./test/monitoring -update\ngot:\n%s\nwant:\n%s", path, got, want)
	}
}
