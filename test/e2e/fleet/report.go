package fleet

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/outposthq/outpost/test/e2e/plot"
)

// Report is a run's result: the configuration, each mode's run, and the
// files written.
type Report struct {
	Config Config
	Runs   []*modeRun
	// Table is the markdown report; Files the paths written.
	Table string
	Files []string
}

// write renders the table, the picture and the samples into cfg.Out.
func (rep *Report) write() error {
	rep.Table = rep.table()
	if err := os.MkdirAll(rep.Config.Out, 0o755); err != nil {
		return err
	}
	md := filepath.Join(rep.Config.Out, "fleet.md")
	if err := os.WriteFile(md, []byte(rep.Table), 0o644); err != nil {
		return err
	}
	rep.Files = append(rep.Files, md)
	csv := filepath.Join(rep.Config.Out, "samples.csv")
	if err := os.WriteFile(csv, []byte(rep.csv()), 0o644); err != nil {
		return err
	}
	rep.Files = append(rep.Files, csv)
	charts := rep.charts()
	if len(charts) == 0 {
		return nil
	}
	for _, ext := range []string{".png", ".svg"} {
		path := filepath.Join(rep.Config.Out, "fleet"+ext)
		if err := plot.Stack(path, charts...); err != nil {
			return fmt.Errorf("drawing %s: %w", path, err)
		}
		rep.Files = append(rep.Files, path)
	}
	return nil
}

// ran are the runs that ran.
func (rep *Report) ran() []*modeRun {
	var out []*modeRun
	for _, r := range rep.Runs {
		if r.Missing == "" {
			out = append(out, r)
		}
	}
	return out
}

// table is the markdown report: one column per mode, one row per figure.
func (rep *Report) table() string {
	cfg := rep.Config
	var b strings.Builder
	fmt.Fprintf(&b, "# Fleet: %d nodes, each with %d informers (kubelet, kube-proxy, coredns, CNI, log agent, monitoring)\n\n",
		cfg.Nodes, watchesPerNode(cfg.PodsPerNode))
	fmt.Fprintf(&b, "Steady %v (second half measured), outage %v (every link black-holed), %v after; churn %v writes/s to each of "+
		"pods, nodes, services, endpointslices, configmaps, secrets; %d namespaces, %d services, %d pods per node. "+
		"Figures from kube-apiserver's own /metrics; requests exclude the harness's own (churn, marker); open watches are %s.\n\n",
		cfg.Steady, cfg.Outage, cfg.After, cfg.Churn, cfg.Namespaces, cfg.Services, cfg.PodsPerNode, rep.watchMetric())
	if len(cfg.OutpostFlags) > 0 {
		fmt.Fprintf(&b, "Every outpost also ran with `%s`.\n\n", strings.Join(cfg.OutpostFlags, " "))
	}
	fmt.Fprintf(&b, "| | %s |\n|---|%s\n", strings.Join(modes(rep.Runs), " | "), strings.Repeat("---|", len(rep.Runs)))
	row := func(name string, f func(r *modeRun) string) {
		cells := make([]string, len(rep.Runs))
		for i, r := range rep.Runs {
			if r.Missing != "" {
				cells[i] = r.Missing
				continue
			}
			cells[i] = f(r)
		}
		fmt.Fprintf(&b, "| %s | %s |\n", name, strings.Join(cells, " | "))
	}
	n := float64(cfg.Nodes)
	row("clients synced after start", func(r *modeRun) string { return secs(r.Synced) })
	row("**start** (to mid-steady): API requests / full lists (LIST + WatchList) / SelfSubjectAccessReviews", func(r *modeRun) string {
		return fmt.Sprintf("%.0f / %.0f + %.0f / %.0f", r.Start.Requests-r.Start.Probes, r.Start.Lists, r.Start.WatchLists, r.Start.Reviews)
	})
	row("outposts, start: clients' answers from upstream / watch cache / offline cache / outpost", func(r *modeRun) string {
		w := r.OutpostStart
		if w.Nodes == 0 {
			return "–"
		}
		return fmt.Sprintf("%.0f / %.0f / %.0f / %.0f", w.Answered["upstream"], w.Answered["watch-cache"], w.Answered["cache"], w.Answered["outpost"])
	})
	row("**steady**: upstream watches open (fleet's)", func(r *modeRun) string {
		return fmt.Sprintf("%.0f", r.Steady.Watchers-r.Baseline.Watchers)
	})
	row("upstream watches per node", func(r *modeRun) string {
		return fmt.Sprintf("%.1f", (r.Steady.Watchers-r.Baseline.Watchers)/n)
	})
	row("API requests/s (+ health probes/s)", func(r *modeRun) string {
		return fmt.Sprintf("%.1f (+ %.1f)", (r.Steady.Requests-r.Steady.Probes)/r.Steady.Seconds, r.Steady.Probes/r.Steady.Seconds)
	})
	row("of which SelfSubjectAccessReviews/s", func(r *modeRun) string {
		return fmt.Sprintf("%.2f", r.Steady.Reviews/r.Steady.Seconds)
	})
	row("bytes/s sent", func(r *modeRun) string { return kib(r.Steady.Bytes/r.Steady.Seconds) + "/s" })
	row("apiserver CPU (cores)", func(r *modeRun) string { return fmt.Sprintf("%.3f", r.Steady.CPU/r.Steady.Seconds) })
	row("apiserver p99 latency (non-watch)", func(r *modeRun) string { return ms(r.Steady.P99) })
	row("apiserver p99 latency (non-watch resource requests: no health probes)", func(r *modeRun) string { return ms(r.Steady.ResourceP99) })
	row("apiserver RSS", func(r *modeRun) string { return fmt.Sprintf("%.0f MB", r.Steady.RSS/1e6) })
	row("the harness's RSS (every node's clients)", func(r *modeRun) string { return fmt.Sprintf("%.0f MB", r.HarnessRSS) })
	row("outpost RSS, median / max", func(r *modeRun) string {
		if len(r.RSS) == 0 {
			return "–"
		}
		s := slices.Sorted(slices.Values(r.RSS))
		return fmt.Sprintf("%.1f / %.1f MB", s[len(s)/2], s[len(s)-1])
	})
	row("outpost RSS anonymous / file-backed, median", func(r *modeRun) string {
		if len(r.RSSAnon) == 0 {
			return "–"
		}
		return fmt.Sprintf("%.1f / %.1f MB", medianMax(r.RSSAnon)[0], medianMax(r.RSSFile)[0])
	})
	outposts(row, "steady", func(r *modeRun) outpostWindow { return r.OutpostSteady })
	row("**outage**: API requests ended (of which WATCH)", func(r *modeRun) string {
		return fmt.Sprintf("%.0f (%.0f)", r.Outage.Requests-r.Outage.Probes, r.Outage.Watches)
	})
	row("links' held connections / harness's open files at its end", func(r *modeRun) string {
		return fmt.Sprintf("%d / %d", r.HeldConns, r.HarnessFiles)
	})
	row("**reconnect** (first "+secs(min(time.Minute, cfg.After))+"): API requests (+ health probes)", func(r *modeRun) string {
		return fmt.Sprintf("%.0f (+ %.0f)", r.Reconnect.Requests-r.Reconnect.Probes, r.Reconnect.Probes)
	})
	row("requests begun: non-WATCH + WatchLists (+ shared streams' resumed watches)", func(r *modeRun) string {
		begun := r.Reconnect.Requests - r.Reconnect.Probes - r.Reconnect.Watches + r.Reconnect.WatchLists
		if r.OutpostReconnect.StreamWatches > 0 {
			return fmt.Sprintf("%.0f (+ %.0f)", begun, r.OutpostReconnect.StreamWatches)
		}
		return fmt.Sprintf("%.0f", begun)
	})
	row("of which WATCH / LIST / 410 Gone", func(r *modeRun) string {
		return fmt.Sprintf("%.0f / %.0f / %.0f", r.Reconnect.Watches, r.Reconnect.Lists, r.Reconnect.Gone)
	})
	row("full re-lists (LIST + WatchList)", func(r *modeRun) string {
		return fmt.Sprintf("%.0f + %.0f", r.Reconnect.Lists, r.Reconnect.WatchLists)
	})
	row("of which SelfSubjectAccessReviews", func(r *modeRun) string { return fmt.Sprintf("%.0f", r.Reconnect.Reviews) })
	row("bytes sent", func(r *modeRun) string { return kib(r.Reconnect.Bytes) })
	row("apiserver CPU (cores, average)", func(r *modeRun) string {
		return fmt.Sprintf("%.3f", r.Reconnect.CPU/r.Reconnect.Seconds)
	})
	row("apiserver p99 latency (× steady)", func(r *modeRun) string {
		if r.Steady.P99 <= 0 || r.Reconnect.P99 < 0 {
			return ms(r.Reconnect.P99)
		}
		return fmt.Sprintf("%s (%.1f×)", ms(r.Reconnect.P99), float64(r.Reconnect.P99)/float64(r.Steady.P99))
	})
	row("apiserver p99 latency, no health probes (× steady)", func(r *modeRun) string {
		if r.Steady.ResourceP99 <= 0 || r.Reconnect.ResourceP99 < 0 {
			return ms(r.Reconnect.ResourceP99)
		}
		return fmt.Sprintf("%s (%.1f×)", ms(r.Reconnect.ResourceP99), float64(r.Reconnect.ResourceP99)/float64(r.Steady.ResourceP99))
	})
	row("every node's clients saw the outage's objects", func(r *modeRun) string {
		if r.NotConverged != "" {
			return fmt.Sprintf("%d of %d nodes only", r.NodesConverged, cfg.Nodes)
		}
		return secs(r.Converged) + " after restore"
	})
	outposts(row, "reconnect", func(r *modeRun) outpostWindow { return r.OutpostReconnect })
	b.WriteString("\n")
	if ran := rep.ran(); len(ran) > 1 && ran[0].Mode == Direct {
		d := ran[0]
		for _, r := range ran[1:] {
			fmt.Fprintf(&b, "- %s vs direct on reconnect: %.2f× the API requests, %.2f× the full re-lists, %.2f× the bytes; %.2f× the upstream watches in steady state.\n",
				r.Mode, ratio(r.Reconnect.Requests-r.Reconnect.Probes, d.Reconnect.Requests-d.Reconnect.Probes),
				ratio(r.Reconnect.Lists+r.Reconnect.WatchLists, d.Reconnect.Lists+d.Reconnect.WatchLists),
				ratio(r.Reconnect.Bytes, d.Reconnect.Bytes),
				ratio(r.Steady.Watchers-r.Baseline.Watchers, d.Steady.Watchers-d.Baseline.Watchers))
		}
	}
	for _, r := range rep.Runs {
		if r.NotConverged != "" {
			fmt.Fprintf(&b, "- %s: %s\n", r.Mode, r.NotConverged)
		}
	}
	return b.String()
}

// outposts adds the rows of the outposts' own figures over a window (from
// their /metrics; "–" in direct mode).
func outposts(row func(string, func(*modeRun) string), name string, of func(*modeRun) outpostWindow) {
	cell := func(f func(w outpostWindow) string) func(*modeRun) string {
		return func(r *modeRun) string {
			w := of(r)
			if w.Nodes == 0 {
				return "–"
			}
			return f(w)
		}
	}
	row("outposts, "+name+": clients' answers from upstream / watch cache / offline cache / outpost", cell(func(w outpostWindow) string {
		return fmt.Sprintf("%.0f / %.0f / %.0f / %.0f", w.Answered["upstream"], w.Answered["watch-cache"], w.Answered["cache"], w.Answered["outpost"])
	}))
	row("outposts, "+name+": shared streams' upstream whole fetches (LIST, WatchList) / resumed WATCHes", cell(func(w outpostWindow) string {
		return fmt.Sprintf("%.0f / %.0f", w.StreamLists, w.StreamWatches)
	}))
	row("outposts, "+name+": consistent WatchLists' freshness reads / catch-up metadata WatchLists", cell(func(w outpostWindow) string {
		return fmt.Sprintf("%.0f / %.0f", w.FreshReads, w.CatchUps)
	}))
	row("outposts, "+name+": access reviews allowed / denied / failed", cell(func(w outpostWindow) string {
		return fmt.Sprintf("%.0f / %.0f / %.0f", w.Reviews["allowed"], w.Reviews["denied"], w.Reviews["error"])
	}))
	row("outposts, end of "+name+": shared streams per node, median / max", cell(func(w outpostWindow) string {
		return fmt.Sprintf("%.0f / %.0f", w.Streams[0], w.Streams[1])
	}))
	row("outposts, end of "+name+": local watches served from them per node, median / max", cell(func(w outpostWindow) string {
		return fmt.Sprintf("%.0f / %.0f", w.Watchers[0], w.Watchers[1])
	}))
	row("outposts, end of "+name+": watch cache memory per node, median / max", cell(func(w outpostWindow) string {
		return fmt.Sprintf("%s / %s", kib(w.Bytes[0]), kib(w.Bytes[1]))
	}))
	row("outposts, end of "+name+": Go heap in use per node, median / max", cell(func(w outpostWindow) string {
		return fmt.Sprintf("%.1f / %.1f MB", w.Heap[0]/1e6, w.Heap[1]/1e6)
	}))
}

// watchMetric names where the open watches were read.
func (rep *Report) watchMetric() string {
	for _, r := range rep.ran() {
		return "`" + r.Baseline.WatchMetric + "`"
	}
	return "not read"
}

// charts are requests/s, bytes/s and open watches over the run, one line
// per mode, time counted from the clients' start, the outage shaded.
func (rep *Report) charts() []plot.Chart {
	ran := rep.ran()
	if len(ran) == 0 {
		return nil
	}
	reqs := plot.Chart{Title: "kube-apiserver API requests/s (health probes left out)", YLabel: "requests/s"}
	bytes := plot.Chart{Title: "kube-apiserver bytes/s sent (answers and watch events)", YLabel: "KiB/s"}
	watches := plot.Chart{Title: "kube-apiserver watches open", YLabel: "watches"}
	for _, r := range ran {
		var rs, bs, ws plot.Series
		rs.Name, bs.Name, ws.Name = r.Mode, r.Mode, r.Mode
		for i := 1; i < len(r.Samples); i++ {
			a, b := r.Samples[i-1], r.Samples[i]
			dt := b.At.Sub(a.At).Seconds()
			if dt <= 0 {
				continue
			}
			at := b.At.Sub(r.T0)
			rs.T, rs.V = append(rs.T, at), append(rs.V, (b.Requests-b.Probes-a.Requests+a.Probes)/dt)
			bs.T, bs.V = append(bs.T, at), append(bs.V, (b.Bytes-a.Bytes)/dt/1024)
			ws.T, ws.V = append(ws.T, at), append(ws.V, b.Watchers)
		}
		reqs.Series = append(reqs.Series, rs)
		bytes.Series = append(bytes.Series, bs)
		watches.Series = append(watches.Series, ws)
	}
	first := ran[0]
	outage := plot.Span{From: first.OutageAt.Sub(first.T0), To: first.RestoreAt.Sub(first.T0), Label: "outage (all links black-holed)"}
	charts := []plot.Chart{reqs, bytes, watches}
	for i := range charts {
		charts[i].Spans = []plot.Span{outage}
	}
	return charts
}

// csv is every sample of every mode, for other tools.
func (rep *Report) csv() string {
	var b strings.Builder
	b.WriteString("mode,seconds,watchers,requests,probes,reviews,lists,watches,watchlists,gone,bytes,cpu_seconds,rss_bytes\n")
	for _, r := range rep.ran() {
		for _, s := range r.Samples {
			fmt.Fprintf(&b, "%s,%.2f,%.0f,%.0f,%.0f,%.0f,%.0f,%.0f,%.0f,%.0f,%.0f,%.3f,%.0f\n", r.Mode, s.At.Sub(r.T0).Seconds(),
				s.Watchers, s.Requests, s.Probes, s.Reviews, s.Lists, s.Watches, s.WatchLists, s.Gone, s.Bytes, s.CPU, s.RSS)
		}
	}
	return b.String()
}

func modes(runs []*modeRun) []string {
	out := make([]string, len(runs))
	for i, r := range runs {
		out[i] = r.Mode
	}
	return out
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

func secs(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + " s" }

func ms(d time.Duration) string {
	if d < 0 {
		return "–"
	}
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 1, 64) + " ms"
}

func kib(b float64) string {
	if b >= 10<<20 {
		return fmt.Sprintf("%.1f MiB", b/(1<<20))
	}
	return fmt.Sprintf("%.1f KiB", b/1024)
}
