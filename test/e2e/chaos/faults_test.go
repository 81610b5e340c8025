package chaos

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// A faultKind is one way things break. inject breaks them for f.hold, puts
// the fault right again (the link may stay for settle to let pass) and
// returns when the cloud became reachable again (zero: now).
type faultKind struct {
	name   string
	inject func(s *soak, f *faultRun) time.Time
}

// faultRun is one injected fault and what followed it.
type faultRun struct {
	n         int
	kind      string
	at, hold  time.Duration // since the soak began; how long it lasted
	detail    string        // what the fault did beyond its kind
	converged convergence   // after the fault
}

func faultKinds(disk bool) []faultKind {
	kinds := []faultKind{
		{"black-hole", func(s *soak, f *faultRun) time.Time { return s.linkFault(f, s.link.Blackhole) }},
		{"reset", func(s *soak, f *faultRun) time.Time { return s.linkFault(f, s.link.Reset) }},
		{"2s latency", func(s *soak, f *faultRun) time.Time {
			return s.linkFault(f, func() { s.link.Latency(2 * time.Second) })
		}},
		{"packet loss", func(s *soak, f *faultRun) time.Time {
			return s.linkFault(f, func() { s.link.Loss(0.05) })
		}},
		{"flapping", (*soak).flap},
		{"kill -9 online", (*soak).killOnline},
		{"kill -9 offline", (*soak).killOffline},
		{"apiserver restart", (*soak).restartAPIServer},
		{"corrupt store", (*soak).corruptStore},
	}
	if disk {
		kinds = append(kinds, faultKind{"disk full", (*soak).fillDisk})
	}
	return kinds
}

// faultNames lists the kinds, for CHAOS_FAULTS.
func faultNames(disk bool) string {
	var names []string
	for _, k := range faultKinds(disk) {
		names = append(names, k.name)
	}
	return strings.Join(names, ",")
}

// linkFault sets the link's mode for the hold, then lets it pass.
func (s *soak) linkFault(f *faultRun, mode func()) time.Time {
	mode()
	sleep(s.t.Context(), f.hold)
	s.link.Pass()
	return time.Now()
}

// flap cuts and restores the link every 1–4 s for the hold.
func (s *soak) flap(f *faultRun) time.Time {
	end := time.Now().Add(f.hold)
	cuts := 0
	for time.Now().Before(end) && s.t.Context().Err() == nil {
		s.link.Blackhole()
		cuts++
		sleep(s.t.Context(), time.Duration(1+s.rng.IntN(4))*time.Second)
		s.link.Pass()
		sleep(s.t.Context(), time.Duration(1+s.rng.IntN(4))*time.Second)
	}
	f.detail = fmt.Sprintf("%d cuts", cuts)
	return time.Now()
}

// killOnline kills outpost while it is online and starts it again at once.
func (s *soak) killOnline(f *faultRun) time.Time {
	s.kill(f.kind)
	s.restart(s.t.Context())
	s.phase.Store(&phase{name: f.kind})
	sleep(s.t.Context(), f.hold)
	return time.Now()
}

// killOffline cuts the link, waits until outpost serves from its cache,
// kills it and starts it again still cut off: it must serve its cache at
// once from the store it left behind.
func (s *soak) killOffline(f *faultRun) time.Time {
	ctx := s.t.Context()
	s.link.Blackhole()
	if _, err := s.o.WaitState(ctx, "offline", 30*time.Second); err != nil {
		s.violation.add("%s #%d: %v", f.kind, f.n, err)
	}
	s.kill(f.kind)
	s.restart(ctx)
	s.phase.Store(&phase{name: f.kind})
	// The first read after the restart must come from the cache.
	if _, err := s.reader.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{LabelSelector: sel}); err != nil {
		s.violation.add("%s #%d: the first read after an offline restart failed: %s", f.kind, f.n, explain(err))
	} else if by := s.reader.servedBy(); by != "cache" {
		s.violation.add("%s #%d: the first read after an offline restart was served by %q, not the cache", f.kind, f.n, by)
	} else {
		f.detail = "first read after the restart served from the cache"
	}
	sleep(ctx, f.hold)
	s.link.Pass()
	return time.Now()
}

// restartAPIServer stops the apiserver for the hold and starts it again.
func (s *soak) restartAPIServer(f *faultRun) time.Time {
	if err := cp.StopAPIServer(0); err != nil {
		s.t.Fatal(err)
	}
	sleep(s.t.Context(), f.hold)
	if err := cp.StartAPIServer(0); err != nil {
		s.t.Fatal(err)
	}
	return time.Now()
}

// corruptStore kills outpost, damages its store file — the meta pages
// overwritten, the file cut to half its pages, or one page in use
// overwritten — and starts it again: it must start and serve. The first
// two are damage outpost's Open looks for: the file must be moved aside.
// The third it finds only when it reads that page.
func (s *soak) corruptStore(f *faultRun) time.Time {
	ctx := s.t.Context()
	s.kill(f.kind)
	db := filepath.Join(s.o.DataDir, "cache.db")
	how := []string{"meta pages overwritten", "truncated to half", "a page overwritten"}[s.rng.IntN(3)]
	if err := corrupt(db, how, s.rng.IntN); err != nil {
		s.t.Fatalf("corrupting %s: %v", db, err)
	}
	s.restart(ctx)
	asides, _ := filepath.Glob(db + ".corrupt-*")
	f.detail = fmt.Sprintf("%s; %d file(s) moved aside", how, len(asides))
	if len(asides) == 0 && how != "a page overwritten" {
		s.violation.add("%s #%d (%s): outpost started but did not move the damaged file aside", f.kind, f.n, how)
	}
	// They would fill the small file system under the store.
	for _, a := range asides {
		_ = os.Remove(a)
	}
	s.phase.Store(&phase{name: f.kind})
	sleep(ctx, f.hold)
	return time.Now()
}

// corrupt damages the bbolt file at path as how says; pick chooses a page.
func corrupt(path, how string, pick func(n int) int) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if how == "truncated to half" {
		// Half of the pages in use, not of the file: bbolt grows its file
		// ahead of use, and cutting only that tail damages nothing.
		used, _, err := boltUsed(path)
		if err != nil {
			return err
		}
		return os.Truncate(path, min(st.Size(), used)/2)
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	used, pageSize, err := boltUsed(path)
	if err != nil {
		return errors.Join(err, f.Close())
	}
	// Both meta pages.
	junk := make([]byte, 2*pageSize)
	at := int64(0)
	if how == "a page overwritten" {
		// One page in use past the two meta pages, header and all.
		pages := used / pageSize
		if pages <= 2 {
			return errors.Join(fmt.Errorf("%s has no page in use beyond its meta pages", path), f.Close())
		}
		junk = make([]byte, pageSize)
		at = pageSize * (2 + int64(pick(int(pages-2))))
	}
	_, _ = rand.Read(junk)
	_, err = f.WriteAt(junk, at)
	return errors.Join(err, f.Close())
}

// boltUsed is how many bytes of a bbolt file its pages in use span: the
// high-water page id of the newer meta page (page 0 or 1) times the page
// size. A meta page: a 16-byte page header, then magic, version, page size
// and flags (4 bytes each), the root bucket (16), the freelist page (8),
// and the high-water page id (8), then the transaction id (8).
func boltUsed(path string) (used, pageSize int64, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, err
	}
	const hdr = 16
	if len(data) < hdr+64 {
		return 0, 0, fmt.Errorf("%s: %d bytes is no bbolt file", path, len(data))
	}
	pageSize = int64(binary.LittleEndian.Uint32(data[hdr+8:]))
	var txid uint64
	for _, off := range []int64{0, pageSize} {
		if off+hdr+64 > int64(len(data)) {
			break
		}
		m := data[off+hdr:]
		if tx := binary.LittleEndian.Uint64(m[48:]); tx >= txid {
			txid, used = tx, int64(binary.LittleEndian.Uint64(m[40:]))*pageSize
		}
	}
	if used <= 0 || pageSize <= 0 {
		return 0, 0, fmt.Errorf("%s: no meta page names its size", path)
	}
	return used, pageSize, nil
}

// fillDisk fills the file system under the store for the hold, while the
// clients go on: online proxying must not break.
func (s *soak) fillDisk(f *faultRun) time.Time {
	n, err := s.disk.fill()
	if err != nil {
		s.t.Fatalf("filling the disk: %v", err)
	}
	f.detail = fmt.Sprintf("%d MiB written until ENOSPC", n>>20)
	sleep(s.t.Context(), f.hold)
	if err := s.disk.free(); err != nil {
		s.t.Fatal(err)
	}
	return time.Now()
}

// A convergence is how the edge came back to the apiserver's state after
// one reconnect: when each check first held, measured from the reconnect,
// and why those that did not hold within their bound did not.
type convergence struct {
	took   map[string]time.Duration
	missed map[string]string
}

// converge waits until the edge has converged to the apiserver's state,
// each check within its bound: every view in outpost's store matches the
// apiserver (`outpost cache diff`), the node's statuses and events
// accepted so far are upstream, and the informer holds exactly what the
// apiserver lists.
func (s *soak) converge(ctx context.Context, restored time.Time) convergence {
	s.writes.mu.Lock()
	nodeSeq, podSeq := s.writes.nodeSeq, s.writes.podSeq
	events := append([]string(nil), s.writes.events...)
	s.writes.mu.Unlock()
	checks := []struct {
		name   string
		within time.Duration
		ok     func(ctx context.Context) (bool, string)
	}{
		{"store", convergeWithin, func(ctx context.Context) (bool, string) { return s.cacheDiff(ctx) }},
		{"statuses", convergeWithin, func(ctx context.Context) (bool, string) { return s.statusesUp(ctx, nodeSeq, podSeq) }},
		{"events", convergeWithin, func(ctx context.Context) (bool, string) {
			missing, err := s.missingEvents(ctx, events)
			if err != nil {
				return false, err.Error()
			}
			return len(missing) == 0, fmt.Sprintf("%d accepted events not in the apiserver: %s", len(missing), head(missing, 5))
		}},
		{"informer", informerWithin, func(ctx context.Context) (bool, string) {
			l, err := s.admin.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{LabelSelector: sel})
			if err != nil {
				return false, err.Error()
			}
			want, got := configMapsState(l.Items), s.informer.state()
			return want == got, "informer differs from the apiserver:\n" + lineDiff(want, got)
		}},
	}
	c := convergence{took: map[string]time.Duration{}, missed: map[string]string{}}
	for {
		pending := 0
		for _, chk := range checks {
			if _, ok := c.took[chk.name]; ok || c.missed[chk.name] != "" {
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			ok, why := chk.ok(cctx)
			cancel()
			switch since := time.Since(restored); {
			case ok:
				c.took[chk.name] = since
			case since > chk.within || ctx.Err() != nil:
				c.missed[chk.name] = fmt.Sprintf("not within %v: %s", chk.within, why)
			default:
				pending++
			}
		}
		if pending == 0 {
			return c
		}
		sleep(ctx, 500*time.Millisecond)
	}
}

// summary is the convergence in one line: each check's time, and what was
// missed.
func (c convergence) summary() string {
	var parts []string
	for _, name := range []string{"store", "statuses", "events", "informer"} {
		if d, ok := c.took[name]; ok {
			parts = append(parts, fmt.Sprintf("%s %v", name, d.Round(10*time.Millisecond)))
		} else if why := c.missed[name]; why != "" {
			parts = append(parts, fmt.Sprintf("**%s %s**", name, strings.ReplaceAll(why, "\n", " ")))
		}
	}
	return strings.Join(parts, ", ")
}

// diffed are the resources whose views `outpost cache diff` compares with
// the apiserver: those the clients read. Not leases: the node updates its
// Lease every second with the object it last read, as kubelet does, so the
// view of its one read is behind by design until the next re-list.
var diffed = []string{"configmaps", "pods", "nodes"}

// cacheDiff runs `outpost cache diff` against the running outpost: every
// view of diffed in its store compared with the apiserver now.
func (s *soak) cacheDiff(ctx context.Context) (bool, string) {
	bin, err := framework.OutpostBinary()
	if err != nil {
		return false, err.Error()
	}
	var why []string
	for _, res := range diffed {
		out, err := exec.CommandContext(ctx, bin, "cache", "diff", "--data-dir="+s.o.DataDir, "--resource="+res).CombinedOutput()
		var exit *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &exit) && exit.ExitCode() == 6:
			why = append(why, "outpost cache diff: "+strings.Join(driftLines(string(out)), " | "))
		default:
			why = append(why, fmt.Sprintf("outpost cache diff --resource=%s: %v: %s", res, err, strings.TrimSpace(string(out))))
		}
	}
	return len(why) == 0, strings.Join(why, "; ")
}

// driftLines keeps the lines of `outpost cache diff` that say what differs.
func driftLines(out string) []string {
	var lines []string
	for l := range strings.Lines(out) {
		if strings.Contains(l, ": ") || strings.Contains(l, "views differ") {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	return lines
}

// statusesUp reports whether the apiserver holds Node and pod statuses at
// least as new as the ones numbered nodeSeq and podSeq.
func (s *soak) statusesUp(ctx context.Context, nodeSeq, podSeq int) (bool, string) {
	n, err := s.admin.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return false, err.Error()
	}
	p, err := s.admin.CoreV1().Pods(ns).Get(ctx, statusPod, metav1.GetOptions{})
	if err != nil {
		return false, err.Error()
	}
	gotNode, gotPod := 0, 0
	for _, c := range n.Status.Conditions {
		if c.Type == "ChaosSeq" {
			_, _ = fmt.Sscan(c.Message, &gotNode)
		}
	}
	for _, c := range p.Status.Conditions {
		if c.Type == "chaos.outpost.io/seq" {
			_, _ = fmt.Sscan(c.Message, &gotPod)
		}
	}
	return gotNode >= nodeSeq && gotPod >= podSeq,
		fmt.Sprintf("apiserver has node status %d (accepted %d), pod status %d (accepted %d)", gotNode, nodeSeq, gotPod, podSeq)
}

// missingEvents returns the events of names the apiserver does not hold.
func (s *soak) missingEvents(ctx context.Context, names []string) ([]string, error) {
	l, err := s.admin.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	have := map[string]bool{}
	for _, e := range l.Items {
		have[e.Name] = true
	}
	var missing []string
	for _, n := range names {
		if !have[n] {
			missing = append(missing, n)
		}
	}
	return missing, nil
}

func head(names []string, n int) string {
	if len(names) > n {
		return strings.Join(names[:n], ",") + ",…"
	}
	return strings.Join(names, ",")
}

// lineDiff says which lines of two canonical states differ.
func lineDiff(want, got string) string {
	w, g := map[string]bool{}, map[string]bool{}
	for l := range strings.Lines(want) {
		w[strings.TrimSpace(l)] = true
	}
	for l := range strings.Lines(got) {
		g[strings.TrimSpace(l)] = true
	}
	var out []string
	for l := range w {
		if !g[l] {
			out = append(out, "  missing: "+l)
		}
	}
	for l := range g {
		if !w[l] {
			out = append(out, "  extra:   "+l)
		}
	}
	if len(out) > 6 {
		out = append(out[:6], fmt.Sprintf("  … %d more", len(out)-6))
	}
	return strings.Join(out, "\n")
}
