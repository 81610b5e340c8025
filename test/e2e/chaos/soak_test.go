package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/outposthq/outpost/test/e2e/framework"
)

const (
	node = "chaos-node"
	ns   = "chaos"
	// sel selects every ConfigMap the soak reads: stable ones, patched but
	// never deleted (a list without all of them is a partial view), and
	// churn, created and deleted all along.
	sel     = "set=chaos"
	stables = 20
	// statusPod is the pod bound to the node whose status the writer
	// numbers, as kubelet writes its pods' statuses.
	statusPod = "status"

	// convergeWithin is the stated bound: after every reconnect outpost's
	// store, the node's statuses and its events converge to the
	// apiserver's state within it.
	convergeWithin = 30 * time.Second
	// informerWithin bounds the informer's convergence, which client-go
	// paces: after its watch ended, the reflector waits before it lists
	// and watches again, 0.8 s doubling up to 30 s while watches keep
	// ending within 2 min (every outpost restart and every reconnect ends
	// them), with jitter up to as much again.
	informerWithin = 70 * time.Second
	// onlineWithin bounds how long outpost may take to say it is online
	// once the link passes again (or it restarted).
	onlineWithin = 60 * time.Second
	// Bounds on outpost's resources over the whole run.
	maxRSSMB = 256
	maxFDs   = 512

	// The short run, as plain `go test` (and `make test`) runs it.
	shortDuration = 40 * time.Second
)

// config is what the environment asks of the run.
type config struct {
	duration time.Duration // CHAOS_DURATION: how long faults are injected
	seed     uint64        // CHAOS_SEED: the schedule of faults
	out      string        // CHAOS_OUT: where the report goes ("": the test's temp dir)
	long     bool          // CHAOS_DURATION was given: longer faults
	only     []string      // CHAOS_FAULTS: only these kinds (comma-separated), to chase one
	args     []string      // CHAOS_OUTPOST_ARGS: more flags of outpost (space-separated), e.g. --watch-cache
}

func loadConfig(t *testing.T) config {
	t.Helper()
	c := config{duration: shortDuration, seed: rand.Uint64() % 1_000_000_000, out: os.Getenv("CHAOS_OUT")}
	if v := os.Getenv("CHAOS_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("CHAOS_DURATION=%q: want a positive duration such as 10m", v)
		}
		c.duration, c.long = d, d >= 3*time.Minute
	}
	if v := os.Getenv("CHAOS_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("CHAOS_SEED=%q: want the unsigned integer a report names", v)
		}
		c.seed = s
	}
	if v := os.Getenv("CHAOS_FAULTS"); v != "" {
		c.only = strings.Split(v, ",")
	}
	c.args = strings.Fields(os.Getenv("CHAOS_OUTPOST_ARGS"))
	if deadline, ok := t.Deadline(); ok && time.Until(deadline) < c.duration+5*time.Minute {
		t.Fatalf("CHAOS_DURATION=%v does not fit in go test's -timeout (%v left); raise it (make chaos: GO_TEST_TIMEOUT)",
			c.duration, time.Until(deadline).Round(time.Second))
	}
	if c.out == "" {
		c.out = t.TempDir()
	} else if err := os.MkdirAll(c.out, 0o755); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestChaos is the soak; see the package comment.
func TestChaos(t *testing.T) {
	cfg := loadConfig(t)
	t.Logf("chaos: seed %d, %v of faults; replay with CHAOS_SEED=%d CHAOS_DURATION=%v", cfg.seed, cfg.duration, cfg.seed, cfg.duration)
	s := newSoak(t, cfg)
	s.run()
	s.finish()
}

// A soak is one run: outpost behind its link, the clients, and what was
// seen.
type soak struct {
	t     *testing.T
	cfg   config
	rng   *rand.Rand // the fault schedule; only the fault goroutine uses it
	start time.Time
	admin kubernetes.Interface

	o    *framework.Outpost
	link *framework.FaultProxy
	disk *tmpfs // nil when the machine does not let the test mount one
	pid  atomic.Int64

	reader, lister *client // token reader, and the node reading as kubelet
	writer         *client // the node writing as kubelet
	informer       *configMapInformer

	phase     atomic.Pointer[phase]
	paused    atomic.Bool // the cloud's writer holds still (convergence checks)
	reads     reads
	writes    writes
	samples   samples
	faults    []*faultRun
	violation violations
	// droppedBefore sums journalDrops of the outpost processes killed so
	// far (each new one counts from zero): beyond the bound, refused.
	droppedBefore [2]float64
	final         struct {
		eventsMissing  []string
		journalDropped [2]float64
		statuses       string
		converged      convergence
	}
}

// phase is what the soak is doing while a request is made.
type phase struct {
	name string // the fault, "settling", or "steady"
	down bool   // outpost is not running (killed, restarting): its clients fail
}

func newSoak(t *testing.T, cfg config) *soak {
	ctx := t.Context()
	s := &soak{t: t, cfg: cfg, rng: rand.New(rand.NewPCG(cfg.seed, 0x6f7574706f7374)), admin: cp.Client()}
	s.phase.Store(&phase{name: "setup"})
	if err := cp.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	cp.CreateNode(t, node, nil)
	for i := range stables {
		s.createConfigMap(ctx, fmt.Sprintf("stable-%02d", i))
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: statusPod},
		Spec: corev1.PodSpec{NodeName: node, AutomountServiceAccountToken: new(false),
			Containers: []corev1.Container{{Name: "c", Image: "example.invalid/chaos:1"}}},
	}
	if _, err := s.admin.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	lease := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: node},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: new(node), LeaseDurationSeconds: new(int32(40))}}
	if _, err := s.admin.CoordinationV1().Leases(corev1.NamespaceNodeLease).Create(ctx, lease, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	token := cp.ServiceAccountToken(t, "default", "chaos-reader", framework.ReaderRole)

	s.o, s.link = cp.StartOutpostWithLinkT(t, node, cfg.args...)
	s.disk = mountStore(t, s.o)
	s.pid.Store(int64(s.o.PID()))
	s.reader = newClient(t, s.o, "", "", token)
	s.lister = newClient(t, s.o, s.o.NodeCertFile, s.o.NodeKeyFile, "")
	s.writer = newClient(t, s.o, s.o.NodeCertFile, s.o.NodeKeyFile, "")
	s.informer = startInformer(t, newClient(t, s.o, "", "", token))
	kubeconfig := filepath.Join(t.TempDir(), "reader.kubeconfig")
	if err := s.o.WriteClientKubeconfig(kubeconfig, "", "", token); err != nil {
		t.Fatal(err)
	}
	s.reads.kubeconfig = kubeconfig
	return s
}

func (s *soak) createConfigMap(ctx context.Context, name string) {
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"set": "chaos"}},
		Data: map[string]string{"v": "0"}}
	if _, err := s.admin.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		s.t.Fatal(err)
	}
}

// at is the time since the soak began, for reports.
func (s *soak) at(t time.Time) time.Duration { return t.Sub(s.start) }

// run starts the clients, injects faults until the duration has passed,
// and stops the clients.
func (s *soak) run() {
	ctx, stop := context.WithCancel(s.t.Context())
	var wg sync.WaitGroup
	s.start = time.Now()
	s.phase.Store(&phase{name: "steady"})
	wg.Go(func() { s.sample(ctx) })
	wg.Go(func() { s.read(ctx) })
	wg.Go(func() { s.kubectl(ctx) })
	wg.Go(func() { s.write(ctx) })
	wg.Go(func() { s.mutate(ctx) })
	defer func() {
		stop()
		wg.Wait()
	}()
	// Let every client record its views before the first fault.
	s.settle(nil, time.Time{})

	kinds := faultKinds(s.disk != nil)
	if s.cfg.only != nil {
		kinds = slices.DeleteFunc(kinds, func(k faultKind) bool { return !slices.Contains(s.cfg.only, k.name) })
		if len(kinds) == 0 {
			s.t.Fatalf("CHAOS_FAULTS=%s names no fault; the faults are %s", strings.Join(s.cfg.only, ","), faultNames(s.disk != nil))
		}
	}
	var order []int
	for time.Since(s.start) < s.cfg.duration && s.t.Context().Err() == nil {
		if len(order) == 0 {
			// Every kind once per round, in a seeded order: a short run
			// sees as many kinds as fit, a long one sees each many times.
			order = s.rng.Perm(len(kinds))
		}
		k := kinds[order[0]]
		order = order[1:]
		f := &faultRun{n: len(s.faults) + 1, kind: k.name, at: time.Since(s.start), hold: s.hold()}
		s.faults = append(s.faults, f)
		s.phase.Store(&phase{name: k.name})
		s.t.Logf("chaos: %v fault %d: %s for %v", f.at.Round(time.Second), f.n, k.name, f.hold)
		restored := k.inject(s, f)
		s.settle(f, restored)
		if gap := time.Duration(1+s.rng.IntN(3)) * time.Second; time.Since(s.start)+gap < s.cfg.duration {
			time.Sleep(gap)
		}
	}
	// The link passes for good: the end state, with the clients still on.
	s.phase.Store(&phase{name: "final"})
	s.settle(nil, time.Now())
	s.checkWrites(s.t.Context())
}

// hold draws how long a fault lasts: beyond outpost's flap window (10 s)
// often enough that outages end with views re-listed.
func (s *soak) hold() time.Duration {
	if s.cfg.long {
		return time.Duration(5+s.rng.IntN(36)) * time.Second
	}
	return time.Duration(4+s.rng.IntN(9)) * time.Second
}

// settle brings the soak back to steady state after fault f (nil: before
// the first), measuring convergence from restored: the link passes,
// outpost runs and is online, the edge converges, and a full round of
// online reads has been recorded.
func (s *soak) settle(f *faultRun, restored time.Time) {
	t := s.t
	ctx := t.Context()
	s.phase.Store(&phase{name: phaseName(f, "settling")})
	s.link.Pass()
	if s.pid.Load() == 0 || s.o.PID() == 0 {
		// Outpost exited on its own: a finding, then a restart to go on.
		s.violation.add("outpost exited by itself during %s; log: %s", phaseName(f, "setup"), s.o.Log(20))
		s.restart(ctx)
	}
	if restored.IsZero() {
		restored = time.Now()
	}
	if _, err := s.o.WaitState(ctx, "online", onlineWithin); err != nil {
		s.violation.add("after %s: %v", phaseName(f, "setup"), err)
		return
	}
	s.paused.Store(true)
	defer s.paused.Store(false)
	c := s.converge(ctx, restored)
	if f != nil {
		f.converged = c
	} else {
		s.final.converged = c
	}
	for name, why := range c.missed {
		s.violation.add("after %s: %s %s", phaseName(f, "setup"), name, strings.ReplaceAll(why, "\n", " "))
	}
	s.t.Logf("chaos: %v %s: converged after the reconnect: %s", s.at(time.Now()).Round(time.Second), phaseName(f, "setup"), c.summary())
	// A full round of online reads, so that the views a restart emptied
	// are recorded again before the next fault.
	if !s.reads.waitRound(ctx, time.Now(), 30*time.Second) {
		s.violation.add("after %s: the reader completed no round of reads within 30 s", phaseName(f, "setup"))
	}
	time.Sleep(time.Second) // the recorder writes in batches
	s.phase.Store(&phase{name: "steady"})
}

func phaseName(f *faultRun, suffix string) string {
	if f == nil {
		return suffix
	}
	return fmt.Sprintf("%s #%d, %s", f.kind, f.n, suffix)
}

// restart starts outpost again after it ended, marking it down meanwhile.
func (s *soak) restart(ctx context.Context) {
	s.pid.Store(0)
	if err := s.o.Start(ctx); err != nil {
		s.abort("the store must always open: starting outpost again: %v", err)
	}
	s.pid.Store(int64(s.o.PID()))
}

// kill ends outpost with SIGKILL; the phase says it is down until restart.
func (s *soak) kill(name string) {
	bound, refused := s.journalDrops()
	s.droppedBefore[0] += bound
	s.droppedBefore[1] += refused
	s.phase.Store(&phase{name: name, down: true})
	s.pid.Store(0)
	s.o.Kill()
}

// journalDrops is how many events the running outpost dropped by policy:
// beyond the journal's bound, and refused by the apiserver on replay.
func (s *soak) journalDrops() (bound, refused float64) {
	bound, _ = s.o.Metric("outpost_journal_dropped_total")
	refused, _ = s.o.Metric("outpost_journal_rejected_total")
	return bound, refused
}

// abort ends the soak on a broken promise it cannot go on from, with the
// report of what it saw until then.
func (s *soak) abort(format string, args ...any) {
	s.violation.add(format, args...)
	s.finish()
	s.t.FailNow()
}

// finish checks the resources and writes the report.
func (s *soak) finish() {
	t := s.t
	if st := s.samples.stats(); st.maxRSS >= maxRSSMB || st.maxFDs >= maxFDs {
		s.violation.add("outpost's resources went beyond their bounds: RSS up to %.1f MB (bound %d), %d open fds (bound %d)", st.maxRSS, maxRSSMB, st.maxFDs, maxFDs)
	}
	// The report marks these too; each is a broken promise.
	s.reads.mu.Lock()
	failed, partial := len(s.reads.failures), len(s.reads.partial)
	s.reads.mu.Unlock()
	if failed > 0 {
		s.violation.add("%d reads failed while outpost ran (see the report's list)", failed)
	}
	if partial > 0 {
		s.violation.add("%d offline lists were partial (see the report's list)", partial)
	}
	rep := s.report()
	path := filepath.Join(s.cfg.out, "report.md")
	if err := os.WriteFile(path, []byte(rep), 0o644); err != nil {
		t.Error(err)
	}
	if err := s.samples.draw(filepath.Join(s.cfg.out, "resources.png"), s.faults, s.start); err != nil {
		t.Errorf("drawing the resources: %v", err)
	}
	// Outpost's own log, every restart in one file, beside the report.
	if data, err := os.ReadFile(s.o.LogPath); err == nil {
		_ = os.WriteFile(filepath.Join(s.cfg.out, "outpost.log"), data, 0o644)
	}
	t.Logf("chaos report (%s, picture resources.png beside it):\n%s", path, rep)
	for _, v := range s.violation.list() {
		t.Error(v)
	}
}
