package peerhealth

import (
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
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
		{10 * time.Second, Dead, Dead},       // 9 s of quorum
		{11 * time.Second, Dead, Withdrawn},  // 10 s
		{12 * time.Second, Unknown, Unknown}, // a break resets the clock
		{13 * time.Second, Dead, Dead},
		{22 * time.Second, Dead, Dead},
		{23 * time.Second, Dead, Withdrawn},
		{30 * time.Second, Alive, Alive},
	}
	for _, s := range steps {
		v = next(v, s.judged, Evidence{}, t0.Add(s.at), grace)
		if v.state != s.want {
			t.Fatalf("at %v judged %s: state %s, want %s", s.at, s.judged, v.state, s.want)
		}
	}
}

// The Tracker over real listers: reports are checked (form, freshness, a
// Node behind the observer), only candidates are judged, the grace period
// runs on the evaluation clock, and Changed and Events follow.
func TestTrackerEvaluate(t *testing.T) {
	nodes := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	leases := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for name, site := range map[string]string{"a": "s1", "b": "s1", "c": "s1", "d": "s2"} {
		_ = nodes.Add(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{zone: site}}})
	}
	t0 := time.Now()
	put := func(observer string, renewed time.Time, reachable, unreachable []string) {
		l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: peer.DefaultNamespace, Name: observer}}
		peer.Report{Observer: observer, Site: "s1", Reachable: reachable, Unreachable: unreachable, Renewed: renewed, Valid: 30 * time.Second}.Apply(l)
		_ = leases.Add(l)
	}
	b := []string{"b"}
	var changed []string
	events := record.NewFakeRecorder(10)
	tr := &Tracker{
		Nodes:     corelisters.NewNodeLister(nodes),
		Reports:   coordinationlisters.NewLeaseLister(leases).Leases(peer.DefaultNamespace),
		SiteLabel: zone,
		Grace:     10 * time.Second,
		Candidate: func(n *corev1.Node) bool { return n.Name == "b" },
		Changed:   func(n string) { changed = append(changed, n) },
		Recorder:  events,
		Log:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	eval := func(at time.Duration, want State) {
		t.Helper()
		if err := tr.Evaluate(t0.Add(at)); err != nil {
			t.Fatal(err)
		}
		if got, ev := tr.Verdict("b"); got != want {
			t.Fatalf("at %v: %s, want %s; evidence %+v", at, got, want, ev)
		}
	}

	put("a", t0, b, nil)
	put("c", t0, b, nil)
	eval(0, Alive)
	put("a", t0, nil, b)
	put("c", t0.Add(-time.Minute), nil, b) // stale
	eval(time.Second, Unknown)
	// A report in the name of no Node, and one from another site.
	put("ghost", t0, nil, b)
	put("d", t0, nil, b)
	eval(2*time.Second, Unknown)
	// A malformed one: holderIdentity is not the Lease's name.
	forged := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: peer.DefaultNamespace, Name: "c"}}
	peer.Report{Observer: "c", Unreachable: b, Renewed: t0, Valid: time.Minute}.Apply(forged)
	forged.Spec.HolderIdentity = new("a")
	_ = leases.Update(forged)
	eval(3*time.Second, Unknown)

	put("c", t0.Add(4*time.Second), nil, b)
	eval(4*time.Second, Dead)
	eval(13*time.Second, Dead)
	if tr.Withdrawn("b") || len(changed) != 0 {
		t.Fatalf("withdrawn before the grace period: %v", changed)
	}
	eval(14*time.Second, Withdrawn)
	if !tr.Withdrawn("b") || !slices.Equal(changed, []string{"b"}) {
		t.Fatalf("Withdrawn %v, changed %v", tr.Withdrawn("b"), changed)
	}
	if tr.Withdrawn("a") {
		t.Error("a is not a candidate, yet withdrawn")
	}
	// b is heard from again: no longer a candidate.
	tr.Candidate = func(*corev1.Node) bool { return false }
	eval(15*time.Second, Unknown)
	if tr.Withdrawn("b") || !slices.Equal(changed, []string{"b", "b"}) {
		t.Fatalf("after b returned: Withdrawn %v, changed %v", tr.Withdrawn("b"), changed)
	}
	close(events.Events)
	var reasons []string
	for e := range events.Events {
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
