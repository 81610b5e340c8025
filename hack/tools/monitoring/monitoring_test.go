// Package monitoring checks deploy/monitoring with Prometheus' own parsers:
// the alerting rules load as Prometheus loads them, every expression of
// the rules and of the dashboard parses, and every metric they name is one
// outpost or outpost-controller exports (deploy/monitoring/
// exported-metrics.txt, which the product module's test/monitoring keeps
// true). It is a module of its own so that Prometheus' dependencies never
// reach outpost's.
package monitoring

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

var dir = filepath.Join("..", "..", "..", "deploy", "monitoring")

// promql parses expressions as Prometheus does by default.
var promql = parser.NewParser(parser.Options{})

// exported reads the metric names outpost exports.
func exported(t *testing.T) map[string]bool {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(dir, "exported-metrics.txt"))
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, line := range strings.Split(string(raw), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			names[line] = true
		}
	}
	if len(names) < 10 {
		t.Fatalf("only %d exported metrics listed", len(names))
	}
	return names
}

// known reports whether a metric name in an expression is exported: listed
// (a histogram's series adding _bucket, _sum, _count), one of every Go
// program's go_* and process_* metrics, or Prometheus' own up.
func known(names map[string]bool, name string) bool {
	if names[name] || name == "up" || strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") {
		return true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok && names[base] {
			return true
		}
	}
	return false
}

// metricNames parses expr and returns the metric names it selects.
func metricNames(t *testing.T, where, expr string) []string {
	t.Helper()
	e, err := promql.ParseExpr(expr)
	if err != nil {
		t.Errorf("%s: %q does not parse: %v", where, expr, err)
		return nil
	}
	var out []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			if vs.Name == "" {
				t.Errorf("%s: %q selects series without a metric name", where, expr)
			}
			out = append(out, vs.Name)
		}
		return nil
	})
	if len(out) == 0 {
		t.Errorf("%s: %q names no metric", where, expr)
	}
	return out
}

func TestAlertRules(t *testing.T) {
	names := exported(t)
	groups, errs := rulefmt.ParseFile(filepath.Join(dir, "outpost-alerts.yaml"), false, model.UTF8Validation, promql, slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Error(err)
	}
	if groups == nil {
		t.Fatal("no rule groups")
	}
	alerts := 0
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			alerts++
			if r.Alert == "" || r.Annotations["summary"] == "" || r.Labels["severity"] == "" {
				t.Errorf("rule %q of %s: an alert with a summary and a severity is expected", r.Alert, g.Name)
			}
			for _, name := range metricNames(t, "alert "+r.Alert, r.Expr) {
				if !known(names, name) {
					t.Errorf("alert %s names %s, which outpost does not export", r.Alert, name)
				}
			}
		}
	}
	if alerts < 8 {
		t.Errorf("%d alerts; want the offline, stale, journal, certificate, store and controller ones", alerts)
	}
}

func TestDashboard(t *testing.T) {
	names := exported(t)
	raw, err := os.ReadFile(filepath.Join(dir, "outpost-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	if d.Title == "" || len(d.Panels) < 8 {
		t.Fatalf("dashboard %q with %d panels", d.Title, len(d.Panels))
	}
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, target := range p.Targets {
			for _, name := range metricNames(t, "panel "+p.Title, target.Expr) {
				if !known(names, name) {
					t.Errorf("panel %q names %s, which outpost does not export", p.Title, name)
				}
			}
		}
	}
}
