package chaos

import (
	"context"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/outposthq/outpost/test/e2e/framework"
	"github.com/outposthq/outpost/test/e2e/plot"
)

// violations are broken promises, each one line, reported at the end.
type violations struct {
	mu    sync.Mutex // guards lines
	lines []string
}

func (v *violations) add(format string, args ...any) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.lines = append(v.lines, fmt.Sprintf(format, args...))
}

func (v *violations) list() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return slices.Clone(v.lines)
}

// A sample is outpost's resources and state at one moment.
type sample struct {
	at    time.Duration
	rssMB float64
	fds   int
	state string // "online", "offline", or "down" (not running)
}

type samples struct {
	mu   sync.Mutex // guards list
	list []sample
}

// sample reads outpost's RSS, open files and state twice a second.
func (s *soak) sample(ctx context.Context) {
	for ctx.Err() == nil {
		smp := sample{at: time.Since(s.start), state: "down"}
		if pid := int(s.pid.Load()); pid != 0 {
			rss, err := framework.StatusMB(pid, "VmRSS:")
			fds, ferr := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
			if err == nil && ferr == nil {
				smp.rssMB, smp.fds = rss, len(fds)
				smp.state = s.o.State(ctx)
			}
		}
		s.samples.mu.Lock()
		s.samples.list = append(s.samples.list, smp)
		s.samples.mu.Unlock()
		sleep(ctx, 500*time.Millisecond)
	}
}

// stats are the extremes of the samples taken while outpost ran.
type stats struct {
	n                      int
	minRSS, maxRSS, endRSS float64
	minFDs, maxFDs, endFDs int
	offline                time.Duration
}

func (s *samples) stats() stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := stats{minRSS: 1e9, minFDs: 1 << 30}
	for i, smp := range s.list {
		if smp.state == "down" {
			continue
		}
		st.n++
		st.minRSS, st.maxRSS, st.endRSS = min(st.minRSS, smp.rssMB), max(st.maxRSS, smp.rssMB), smp.rssMB
		st.minFDs, st.maxFDs, st.endFDs = min(st.minFDs, smp.fds), max(st.maxFDs, smp.fds), smp.fds
		if smp.state == "offline" && i > 0 {
			st.offline += smp.at - s.list[i-1].at
		}
	}
	return st
}

// draw writes the RSS and open-files curves, the faults marked and the
// times outpost was offline or down shaded.
func (s *samples) draw(path string, faults []*faultRun, start time.Time) error {
	s.mu.Lock()
	rss := plot.Series{Name: "RSS (MB)"}
	fds := plot.Series{Name: "open fds"}
	var spans []plot.Span
	for i, smp := range s.list {
		if smp.state != "down" {
			rss.T, rss.V = append(rss.T, smp.at), append(rss.V, smp.rssMB)
			fds.T, fds.V = append(fds.T, smp.at), append(fds.V, float64(smp.fds))
		}
		if i > 0 && (smp.state == "offline" || smp.state == "down") {
			label := "outpost " + smp.state
			from := s.list[i-1].at
			if n := len(spans); n > 0 && spans[n-1].Label == label && spans[n-1].To == from {
				spans[n-1].To = smp.at
			} else {
				spans = append(spans, plot.Span{From: from, To: smp.at, Label: label})
			}
		}
	}
	s.mu.Unlock()
	var marks []plot.Mark
	for _, f := range faults {
		marks = append(marks, plot.Mark{At: f.at, Label: f.kind})
	}
	return plot.Stack(path,
		plot.Chart{Title: "outpost RSS under chaos", YLabel: "MB", Series: []plot.Series{rss}, Spans: spans, Marks: marks},
		plot.Chart{Title: "outpost open file descriptors", YLabel: "fds", Series: []plot.Series{fds}, Spans: spans, Marks: marks},
	)
}

// checkWrites checks, once the link is back for good, that every event
// the node wrote is in the apiserver or was dropped by policy (the
// journal's bound, counted by outpost), and that the apiserver holds the
// node's last statuses.
func (s *soak) checkWrites(ctx context.Context) {
	w := &s.writes
	w.mu.Lock()
	events := slices.Clone(w.events)
	nodeSeq, podSeq := w.nodeSeq, w.podSeq
	w.mu.Unlock()
	missing, err := s.missingEvents(ctx, events)
	if err != nil {
		s.violation.add("listing events: %v", err)
	}
	bound, refused := s.journalDrops()
	bound, refused = bound+s.droppedBefore[0], refused+s.droppedBefore[1]
	s.final.eventsMissing, s.final.journalDropped = missing, [2]float64{bound, refused}
	if dropped := bound + refused; float64(len(missing)) > dropped {
		s.violation.add("%d of %d accepted events never reached the apiserver (outpost dropped %v by policy): %s",
			len(missing), len(events), dropped, head(missing, 10))
	}
	ok, why := s.statusesUp(ctx, nodeSeq, podSeq)
	s.final.statuses = why
	if !ok {
		s.violation.add("the node's last statuses are not in the apiserver: %s", why)
	}
}

// report is the markdown report of the run.
func (s *soak) report() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	st := s.samples.stats()
	r := &s.reads
	r.mu.Lock()
	defer r.mu.Unlock()
	w := &s.writes
	w.mu.Lock()
	defer w.mu.Unlock()
	viol := s.violation.list()

	p("# Chaos soak\n\n")
	p("Seed **%d**, %v of faults (%d injected), run %s. Replay: `make chaos CHAOS_SEED=%d CHAOS_DURATION=%v`.\n\n",
		s.cfg.seed, s.cfg.duration, len(s.faults), s.start.UTC().Format(time.RFC3339), s.cfg.seed, s.cfg.duration)
	p("The seed fixes the faults, their order, durations and variants, and the cloud's changes; timing on a shared machine does not replay exactly.\n\n")

	// Convergence times by check, over every fault and the end.
	conv := map[string][]time.Duration{}
	missed := map[string]int{}
	for _, c := range append(s.faultConvergences(), s.final.converged) {
		for name, d := range c.took {
			conv[name] = append(conv[name], d)
		}
		for name := range c.missed {
			missed[name]++
		}
	}
	convRow := func(names ...string) (bool, string) {
		var parts []string
		n := 0
		for _, name := range names {
			ds := conv[name]
			slices.Sort(ds)
			n += missed[name]
			parts = append(parts, fmt.Sprintf("%s %s, %d missed", name, durations(ds), missed[name]))
		}
		return n == 0, strings.Join(parts, "; ")
	}
	restarts := 0
	for _, f := range s.faults {
		if strings.HasPrefix(f.kind, "kill") || f.kind == "corrupt store" {
			restarts++
		}
	}
	mark := func(ok bool) string {
		if ok {
			return "✓"
		}
		return "✗"
	}
	var acc []string
	for k, n := range w.accepted {
		acc = append(acc, fmt.Sprintf("%s %d", k, n))
	}
	sort.Strings(acc)
	p("| invariant | result | measured |\n|---|---|---|\n")
	p("| reads never fail while outpost runs (offline: from its cache) | %s | %d reads: %d from the cache, %d upstream, **%d failed**; %d made while outpost was down (killed/restarting) not counted; %d of them kubectl |\n",
		mark(len(r.failures) == 0), r.total, r.cached, r.upstream, len(r.failures), r.down, r.kubectl)
	p("| never a partial view (every cached list holds all %d stable ConfigMaps) | %s | %d partial |\n", stables, mark(len(r.partial) == 0), len(r.partial))
	ok, row := convRow("store", "statuses", "events")
	p("| after every reconnect outpost converges within %v: `outpost cache diff` clean (ConfigMaps, pods, nodes), the node's statuses and events upstream | %s | %d faults and the end; time from the reconnect: %s |\n",
		convergeWithin, mark(ok), len(s.faults), row)
	ok, row = convRow("informer")
	p("| after every reconnect the informer through outpost holds what the apiserver lists within %v (client-go's back-off) | %s | %s |\n", informerWithin, mark(ok), row)
	dropped := s.final.journalDropped
	p("| offline writes reach the apiserver or are dropped by policy (0 silently lost) | %s | %d events accepted (%d journaled offline), %d missing at the end; outpost dropped %v beyond the journal's bound, %v refused by the apiserver on replay; %s |\n",
		mark(float64(len(s.final.eventsMissing)) <= dropped[0]+dropped[1] && !strings.Contains(strings.Join(viol, "\n"), "last statuses")),
		len(w.events), w.local, len(s.final.eventsMissing), dropped[0], dropped[1], s.final.statuses)
	p("| the store always opens | %s | %d restarts (kill -9 online/offline, corrupt file), all started |\n", mark(true), restarts)
	if s.disk != nil {
		p("| a full disk never breaks online proxying | %s | %d reads while the store's disk was full, %d failed, %d from the cache |\n",
			mark(r.diskFull.failed == 0), r.diskFull.reads, r.diskFull.failed, r.diskFull.cached)
	} else {
		p("| a full disk never breaks online proxying | skipped | not root: no file system of its own under the store |\n")
	}
	p("| RSS bounded (< %d MB) | %s | %.1f–%.1f MB, %.1f MB at the end (%d samples) |\n", maxRSSMB, mark(st.maxRSS < maxRSSMB), st.minRSS, st.maxRSS, st.endRSS, st.n)
	p("| open fds bounded (< %d) | %s | %d–%d, %d at the end |\n", maxFDs, mark(st.maxFDs < maxFDs), st.minFDs, st.maxFDs, st.endFDs)
	p("\nOutpost was offline %v of the run. Writes accepted: %s.\n", st.offline.Round(time.Second), strings.Join(acc, ", "))

	p("\n## Faults\n\n| # | at | fault | held | detail | reconnect → converged |\n|---|---|---|---|---|---|\n")
	for _, f := range s.faults {
		p("| %d | %v | %s | %v | %s | %s |\n", f.n, f.at.Round(time.Second), f.kind, f.hold, f.detail, f.converged.summary())
	}
	if len(r.failures) > 0 {
		p("\n## Failed reads\n\n")
		for _, f := range r.failures {
			p("- %s\n", f)
		}
	}
	if len(r.partial) > 0 {
		p("\n## Partial views\n\n")
		for _, f := range r.partial {
			p("- %s\n", f)
		}
	}
	if len(w.failures) > 0 {
		p("\n## Refused writes (the client was told; kubelet retries these)\n\n| write | phase | error | count |\n|---|---|---|---|\n")
		var keys []string
		for k := range w.failures {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			p("| %s | %d |\n", k, w.failures[k])
		}
	}
	if len(viol) > 0 {
		p("\n## Violations\n\n")
		for _, v := range viol {
			p("- %s\n", strings.ReplaceAll(v, "\n", " "))
		}
	}
	return b.String()
}

func (s *soak) faultConvergences() []convergence {
	var cs []convergence
	for _, f := range s.faults {
		cs = append(cs, f.converged)
	}
	return cs
}

// durations summarises convergence times: median and max.
func durations(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none measured"
	}
	return fmt.Sprintf("median %v, max %v", ds[len(ds)/2].Round(time.Millisecond), ds[len(ds)-1].Round(time.Millisecond))
}
