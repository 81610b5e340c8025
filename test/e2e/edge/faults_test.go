package edge

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A fault is one way the link to the cloud breaks, held for a while.
type fault struct {
	name string
	// run breaks the link for about d, leaving it broken or not.
	run func(e *edge, d time.Duration)
	d   time.Duration
}

// faultTime is how long each fault lasts: long enough for outpost to notice
// and serve a good many reads from its cache.
const faultTime = 15 * time.Second

// flapPeriod is the half-period of the flapping link, shorter than
// outpost's default flap window (10 s), so no flap may cause a re-list.
const flapPeriod = 5 * time.Second

var faults = []fault{
	{"black-hole", func(e *edge, d time.Duration) { e.proxy.Blackhole(); time.Sleep(d) }, faultTime},
	{"connection reset", func(e *edge, d time.Duration) { e.proxy.Reset(); time.Sleep(d) }, faultTime},
	{"2s latency", func(e *edge, d time.Duration) { e.proxy.Latency(2 * time.Second); time.Sleep(d) }, faultTime},
	{"flapping every 5s", func(e *edge, d time.Duration) {
		for end := time.Now().Add(d); time.Now().Before(end); {
			e.proxy.Blackhole()
			time.Sleep(flapPeriod)
			e.proxy.Pass()
			time.Sleep(flapPeriod)
		}
	}, 4 * flapPeriod},
}

// TestFaults breaks the link in each way for a bounded time while a reader
// keeps reading through outpost and the cloud keeps changing: no cached
// read may fail, and after the last restore the edge converges to the
// cloud, in what it answers online and in what its store holds.
func TestFaults(t *testing.T) {
	const (
		node = "faults-node"
		ns   = "faults"
		sel  = "set=faults"
	)
	ctx := t.Context()
	admin := cp.Client()
	nodeNamespace(t, node, ns)
	createConfigMaps(t, ns, "f", 10, "faults", "0")
	e := startEdge(t, node)
	reader := e.tokenClient(t, readerToken(t, "faults-reader"))
	selected := metav1.ListOptions{LabelSelector: sel}
	read := func(ctx context.Context) error {
		if _, err := reader.CoreV1().ConfigMaps(ns).List(ctx, selected); err != nil {
			return fmt.Errorf("list: %w", err)
		}
		if _, err := reader.CoreV1().ConfigMaps(ns).Get(ctx, "f-0", metav1.GetOptions{}); err != nil {
			return fmt.Errorf("get f-0: %w", err)
		}
		return nil
	}
	if err := read(ctx); err != nil {
		t.Fatalf("online read through outpost: %v", err)
	}
	informerState := configMapInformer(t, reader, ns, sel)
	time.Sleep(time.Second) // the recorder writes in batches

	// The reader: reads through outpost without pause, and counts.
	stats := newReadStats()
	readerCtx, stopReader := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		for readerCtx.Err() == nil {
			phase := stats.current()
			start := time.Now()
			rctx, cancel := context.WithTimeout(readerCtx, 10*time.Second)
			err := read(rctx)
			cancel()
			if readerCtx.Err() != nil {
				return
			}
			stats.record(phase, time.Since(start), err)
			time.Sleep(50 * time.Millisecond)
		}
	})
	// The cloud changes all along.
	wg.Go(func() {
		for i := 0; readerCtx.Err() == nil; i++ {
			name := fmt.Sprintf("f-%d", i%10)
			patch := fmt.Appendf(nil, `{"data":{"v":"%d"}}`, i)
			_, _ = admin.CoreV1().ConfigMaps(ns).Patch(readerCtx, name, "application/merge-patch+json", patch, metav1.PatchOptions{})
			time.Sleep(300 * time.Millisecond)
		}
	})

	for _, f := range faults {
		logAt := fileSize(e.o.LogPath)
		stats.begin(f.name)
		cutAt := time.Now()
		done := make(chan struct{})
		go func() {
			defer close(done)
			f.run(e, f.d)
		}()
		first, _ := firstCachedAnswer(t, reader, cutAt, 15*time.Second, read)
		figure(t, "%s: cut → first cached answer: %v", f.name, ms(first))
		<-done
		e.proxy.Pass()
		stats.begin(f.name + ", restoring")
		online, err := e.waitState(ctx, "online", 30*time.Second)
		if err != nil {
			t.Error(err)
			continue
		}
		figure(t, "%s: link back → online: %v", f.name, ms(online))
		// Let the edge settle online before the next fault: the
		// reconnect's steps (re-listing after a long outage begins a few
		// seconds after the link returned) end before it.
		time.Sleep(2 * time.Second)
		if _, ok := waitFor(t, 60*time.Second, "the reconnect's steps to end", func(context.Context) (bool, string) {
			_, r := statusReport(t, e.o)
			return r.LastReconnect == nil || !r.LastReconnect.Done.IsZero(), fmt.Sprintf("last reconnect %+v", r.LastReconnect)
		}); !ok {
			t.FailNow()
		}
		stats.begin("online")
		if strings.HasPrefix(f.name, "flapping") {
			// Every outage was shorter than the flap window: none may
			// have caused a re-list (outpost logs each reconnect and
			// each re-list).
			log := readFrom(e.o.LogPath, logAt)
			reconnects, relists := strings.Count(log, "cloud reachable again"), strings.Count(log, "re-listed cached views")
			figure(t, "%s: %d reconnects, %d re-lists", f.name, reconnects, relists)
			if relists > 0 {
				t.Errorf("flapping every %v (under the 10s flap window) caused %d re-lists", flapPeriod, relists)
			}
		}
	}
	stopReader()
	wg.Wait()
	for _, line := range stats.summary() {
		figure(t, "%s", line)
	}
	if failed := stats.failures(); len(failed) > 0 {
		t.Errorf("%d reads through outpost failed:\n  %s", len(failed), strings.Join(failed[:min(len(failed), 15)], "\n  "))
	}

	// Convergence after the last restore: online answers, the informer,
	// and — by one more cut — what the store holds.
	restoreAt := time.Now()
	cloud, edgeList := listedConfigMaps(admin, ns, sel), listedConfigMaps(reader, ns, sel)
	informed := func(context.Context) (string, error) { return informerState(), nil }
	for _, c := range []struct {
		what string
		read func(context.Context) (string, error)
	}{{"reads", edgeList}, {"informer", informed}} {
		if _, ok := waitFor(t, 30*time.Second, c.what+" through outpost match the apiserver after the faults", func(ctx context.Context) (bool, string) {
			want, err := cloud(ctx)
			if err != nil {
				return false, err.Error()
			}
			got, err := c.read(ctx)
			if err != nil {
				return false, err.Error()
			}
			return got == want, diff(want, got)
		}); ok {
			figure(t, "after the faults: %s converged %v after the cloud stopped changing", c.what, ms(time.Since(restoreAt)))
		}
	}
	want, err := cloud(ctx)
	if err != nil {
		t.Fatal(err)
	}
	e.proxy.Blackhole()
	defer e.proxy.Pass()
	if _, err := e.waitState(ctx, "offline", 15*time.Second); err != nil {
		t.Fatal(err)
	}
	if got, err := edgeList(ctx); err != nil {
		t.Errorf("cached list after the faults: %v", err)
	} else if got != want {
		t.Errorf("after the faults, outpost's store is not the cloud's state:\n%s", diff(want, got))
	}
}

// readStats counts reads by phase.
type readStats struct {
	mu     sync.Mutex // guards the fields below
	phase  string
	order  []string
	byName map[string]*phaseStats
	failed []string
	start  time.Time
}

type phaseStats struct {
	reads, failures int
	slowest         time.Duration
}

func newReadStats() *readStats {
	s := &readStats{byName: map[string]*phaseStats{}, start: time.Now()}
	s.begin("online")
	return s
}

func (s *readStats) begin(phase string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.phase = phase
	if s.byName[phase] == nil {
		s.byName[phase] = &phaseStats{}
		s.order = append(s.order, phase)
	}
}

func (s *readStats) current() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.phase
}

func (s *readStats) record(phase string, took time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.byName[phase]
	p.reads++
	p.slowest = max(p.slowest, took)
	if err != nil {
		p.failures++
		s.failed = append(s.failed, fmt.Sprintf("[%s, at %v, after %v] %v", phase, ms(time.Since(s.start)), ms(took), err))
	}
}

func (s *readStats) summary() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, name := range s.order {
		p := s.byName[name]
		if p.reads == 0 {
			continue
		}
		out = append(out, fmt.Sprintf("reader during %s: %d reads, %d failed, slowest %v", name, p.reads, p.failures, ms(p.slowest)))
	}
	return out
}

func (s *readStats) failures() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.failed...)
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// readFrom returns the content of path from offset on.
func readFrom(path string, offset int64) string {
	data, err := os.ReadFile(path)
	if err != nil || offset > int64(len(data)) {
		return ""
	}
	return string(data[offset:])
}
