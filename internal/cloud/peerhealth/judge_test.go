package peerhealth

import (
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coordinationlisters "k8s.io/client-go/listers/coordination/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/outposthq/outpost/internal/peer"
)

const zone = corev1.LabelTopologyZone

func TestQuorum(t *testing.T) {
	for peers, want := range map[int]int{0: 2, 1: 2, 2: 2, 3: 2, 4: 3, 5: 3, 9: 5, 10: 6} {
		if got := Quorum(peers); got != want {
			t.Errorf("Quorum(%d) = %d, want %d", peers, got, want)
		}
	}
}

// cluster is the state a test evaluates: nodes by site, reports by observer.
type cluster struct {
	sites   map[string]string // node → site
	reports []peer.Report
}

func (c cluster) view() *view {
	v := &view{sites: c.sites, members: map[string]int{}, reports: map[string]peer.Report{}}
	for _, s := range c.sites {
		if s != "" {
			v.members[s]++
		}
	}
	for _, r := range c.reports {
		v.reports[r.Observer] = r
	}
	v.index()
	return v
}

func report(observer string, reachable, unreachable []string) peer.Report {
	return peer.Report{Observer: observer, Reachable: reachable, Unreachable: unreachable, Renewed: time.Now(), Valid: time.Minute}
}

func TestJudge(t *testing.T) {
	site3 := map[string]string{"a": "s1", "b": "s1", "c": "s1", "d": "s2", "e": "s2", "x": ""}
	site5 := map[string]string{"a": "s1", "b": "s1", "c": "s1", "d": "s1", "e": "s1"}
	b := []string{"b"}
	tests := []struct {
		name    string
		sites   map[string]string
		reports []peer.Report
		want    State
	}{
		{"no reports", site3, nil, Unknown},
		{"both peers reach it", site3, []peer.Report{report("a", b, nil), report("c", b, nil)}, Alive},
		{"one peer reaches it, one cannot", site3, []peer.Report{report("a", b, nil), report("c", nil, b)}, Alive},
		{"both peers cannot reach it", site3, []peer.Report{report("a", nil, b), report("c", nil, b)}, Dead},
		{"a single peer cannot reach it", site3, []peer.Report{report("a", nil, b)}, Unknown},
		{"one peer and two nodes of another site", site3, []peer.Report{report("a", nil, b), report("d", nil, b), report("e", nil, b)}, Unknown},
		{"only nodes of another site", site3, []peer.Report{report("d", nil, b), report("e", nil, b)}, Unknown},
		{"another site's node says alive: ignored", site3, []peer.Report{report("a", nil, b), report("c", nil, b), report("d", b, nil)}, Dead},
		{"the node about itself", site3, []peer.Report{report("b", b, nil), report("a", nil, b), report("c", nil, b)}, Dead},
		{"a node with no site", map[string]string{"a": "s1", "b": "", "c": "s1"}, []peer.Report{report("a", nil, b), report("c", nil, b)}, Unknown},
		{"site of five: two of four is no majority", site5, []peer.Report{report("a", nil, b), report("c", nil, b)}, Unknown},
		{"site of five: three of four", site5, []peer.Report{report("a", nil, b), report("c", nil, b), report("d", nil, b)}, Dead},
		{"one peer naming it twice is one peer", site3, []peer.Report{report("a", nil, []string{"b", "b"})}, Unknown},
		{"site of two: one peer can never decide", map[string]string{"a": "s1", "b": "s1"}, []peer.Report{report("a", nil, b)}, Unknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ev := cluster{sites: tt.sites, reports: tt.reports}.view().judge("b")
			if got != tt.want {
				t.Errorf("judge = %s, want %s; evidence %+v", got, tt.want, ev)
			}
		})
	}
}

func TestNextHoldsGrace(t *testing.T) {
	t0 := time.Unix(1000, 0)
	grace := 10 * time.Second
	var v verdict
	steps := []struct {
		at     time.Duration
		judged State
		want   State
	}{
		{0, Alive, Alive},
		{1 * time.Second, Dead, Dead},
		{10 * time.Second, Dead, Dead},         // 9 s of quorum
		{11 * time.Second, Dead, Withdrawn},    // 10 s
		{12 * time.Second, Unknown, Withdrawn}, // the observers fell silent: no one says it is back
		{13 * time.Second, Alive, Alive},       // a peer reaches it
		{14 * time.Second, Dead, Dead},
		{15 * time.Second, Unknown, Unknown}, // a break before the grace period resets the clock
		{16 * time.Second, Dead, Dead},
		{25 * time.Second, Dead, Dead},
		{26 * time.Second, Dead, Withdrawn},
		{30 * time.Second, Alive, Alive},
	}
	for _, s := range steps {
		v = next(v, s.judged, Evidence{}, t0.Add(s.at), grace)
		if v.state != s.want {
			t.Fatalf("at %v judged %s: state %s, want %s", s.at, s.judged, v.state, s.want)
		}
	}
}

// trackerFixture is a Tracker over real listers of four nodes (a, b, c at
// s1, d at s2), judging b only, with a clock of its own.
type trackerFixture struct {
	t       *testing.T
	tr      *Tracker
	leases  cache.Indexer
	t0      time.Time
	rv      int
	changed []string
	events  *record.FakeRecorder
}

func newTrackerFixture(t *testing.T) *trackerFixture {
	nodes := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	leases := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for name, site := range map[string]string{"a": "s1", "b": "s1", "c": "s1", "d": "s2"} {
		_ = nodes.Add(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{zone: site}}})
	}
	f := &trackerFixture{t: t, leases: leases, t0: time.Now(), events: record.NewFakeRecorder(10)}
	f.tr = &Tracker{
		Nodes:     corelisters.NewNodeLister(nodes),
		Reports:   coordinationlisters.NewLeaseLister(leases).Leases(peer.DefaultNamespace),
		SiteLabel: zone,
		Grace:     10 * time.Second,
		Validity:  5 * time.Second,
		Candidate: func(n *corev1.Node) bool { return n.Name == "b" },
		Changed:   func(n string) { f.changed = append(f.changed, n) },
		Recorder:  f.events,
		Log:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	return f
}

// put writes observer's report, as a new resourceVersion. Its node-written
// times claim an hour of validity from an hour ahead: not to be trusted.
func (f *trackerFixture) put(observer string, reachable, unreachable []string) *coordinationv1.Lease {
	l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: peer.DefaultNamespace, Name: observer}}
	peer.Report{Observer: observer, Site: "s1", Reachable: reachable, Unreachable: unreachable, Renewed: f.t0.Add(time.Hour), Valid: time.Hour}.Apply(l)
	f.rv++
	l.ResourceVersion = fmt.Sprint(f.rv)
	_ = f.leases.Update(l)
	return l
}

func (f *trackerFixture) eval(at time.Duration, want State) {
	f.t.Helper()
	if err := f.tr.Evaluate(f.t0.Add(at)); err != nil {
		f.t.Fatal(err)
	}
	if got, ev := f.tr.Verdict("b"); got != want {
		f.t.Fatalf("at %v: %s, want %s; evidence %+v", at, got, want, ev)
	}
}

// The Tracker over real listers: reports are checked (form, freshness on
// the controller's clock, a Node behind the observer), only candidates are
// judged, the grace period runs on the evaluation clock, withdrawn holds
// until the node is heard from or reached, and Changed and Events follow.
func TestTrackerEvaluate(t *testing.T) {
	f := newTrackerFixture(t)
	b := []string{"b"}
	// Present before the first evaluation: written at an unknown time, so
	// not counted until written again.
	f.put("a", nil, b)
	f.put("c", nil, b)
	f.eval(0, Unknown)

	f.put("a", b, nil)
	f.put("c", b, nil)
	f.eval(time.Second, Alive)
	// c's report, seen written at 1 s, no longer counts at 6 s, whatever
	// its own renewTime and leaseDurationSeconds say.
	f.put("a", nil, b)
	f.eval(5*time.Second, Alive)
	f.eval(6*time.Second, Unknown)
	// A report in the name of no Node, and one from another site.
	f.put("ghost", nil, b)
	f.put("d", nil, b)
	f.eval(6*time.Second, Unknown)
	// A malformed one: holderIdentity is not the Lease's name.
	forged := f.put("c", nil, b)
	forged.Spec.HolderIdentity = new("a")
	_ = f.leases.Update(forged)
	f.eval(7*time.Second, Unknown)

	f.put("a", nil, b)
	f.put("c", nil, b)
	f.eval(8*time.Second, Dead)
	f.put("a", nil, b)
	f.put("c", nil, b)
	f.eval(12*time.Second, Dead)
	f.put("a", nil, b)
	f.put("c", nil, b)
	f.eval(17*time.Second, Dead)
	if f.tr.Withdrawn("b") || len(f.changed) != 0 {
		t.Fatalf("withdrawn before the grace period: %v", f.changed)
	}
	f.eval(18*time.Second, Withdrawn)
	if !f.tr.Withdrawn("b") || !slices.Equal(f.changed, []string{"b"}) {
		t.Fatalf("Withdrawn %v, changed %v", f.tr.Withdrawn("b"), f.changed)
	}
	if f.tr.Withdrawn("a") {
		t.Error("a is not a candidate, yet withdrawn")
	}
	// The observers fall silent: nobody says b is back, it stays withdrawn.
	f.eval(30*time.Second, Withdrawn)
	// b is heard from again: no longer a candidate.
	f.tr.Candidate = func(*corev1.Node) bool { return false }
	f.eval(31*time.Second, Unknown)
	if f.tr.Withdrawn("b") || !slices.Equal(f.changed, []string{"b", "b"}) {
		t.Fatalf("after b returned: Withdrawn %v, changed %v", f.tr.Withdrawn("b"), f.changed)
	}
	close(f.events.Events)
	var reasons []string
	for e := range f.events.Events {
		reasons = append(reasons, fmt.Sprint(e))
	}
	want := []string{"Normal " + ReasonPeersReach, "Warning " + ReasonPeersCannot, "Warning " + ReasonWithdrawn, "Normal " + ReasonAutonomyResume}
	if len(reasons) != len(want) {
		t.Fatalf("events %q, want reasons %q", reasons, want)
	}
	for i := range want {
		if !strings.HasPrefix(reasons[i], want[i]) {
			t.Errorf("event %d: %q, want %q", i, reasons[i], want[i])
		}
	}
}

// A node's own leaseDurationSeconds shortens how long its report counts,
// never lengthens it past the controller's Validity.
func TestTrackerNodeValidityOnlyShortens(t *testing.T) {
	f := newTrackerFixture(t)
	f.eval(0, Unknown)
	f.put("a", nil, []string{"b"})
	short := f.put("c", nil, []string{"b"})
	short.Spec.LeaseDurationSeconds = new(int32(2))
	_ = f.leases.Update(short) // same resourceVersion: the same write
	f.eval(time.Second, Dead)
	f.eval(2500*time.Millisecond, Dead)
	f.eval(3*time.Second, Unknown) // c's 2 s from its write at 1 s are over
}

// Withdrawn, asked by the webhooks, does not wait for an evaluation.
func TestWithdrawnDoesNotWaitForEvaluate(t *testing.T) {
	f := newTrackerFixture(t)
	inside, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	f.tr.Candidate = func(*corev1.Node) bool {
		once.Do(func() { close(inside); <-release })
		return true
	}
	done := make(chan error, 1)
	go func() { done <- f.tr.Evaluate(f.t0) }()
	<-inside
	answered := make(chan bool, 1)
	go func() { answered <- f.tr.Withdrawn("b") }()
	select {
	case <-answered:
	case <-time.After(5 * time.Second):
		t.Error("Withdrawn waited for an evaluation")
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
