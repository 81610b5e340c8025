package peerhealth

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	coordinationlisters "k8s.io/client-go/listers/coordination/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/outposthq/outpost/internal/peer"
)

// Event reasons on the Node.
const (
	ReasonPeersReach     = "PeersReachNode"
	ReasonPeersCannot    = "PeersCannotReachNode"
	ReasonWithdrawn      = "AutonomyWithdrawn"
	ReasonAutonomyResume = "AutonomyResumed"
)

// Tracker keeps the peers' verdict on every unreachable autonomous node,
// evaluating the listers' state every Interval. Set the fields, then call
// Run once; Withdrawn may be called at any time from any goroutine.
type Tracker struct {
	Nodes corelisters.NodeLister
	// Reports lists the report Leases of the reports namespace.
	Reports coordinationlisters.LeaseNamespaceLister
	// SiteLabel names the Node label of a node's site.
	SiteLabel string
	// Grace is how long a quorum must say dead before autonomy is withdrawn.
	Grace time.Duration
	// Validity is how long a report counts after this process saw it
	// written (its resourceVersion change), on this process's clock; the
	// node's own leaseDurationSeconds counts only when shorter, and its
	// renewTime not at all. Zero means DefaultValidity.
	Validity time.Duration
	// Interval is the time between evaluations; zero means one second.
	Interval time.Duration
	// Candidate reports whether a node is one the verdict is for: autonomous
	// by its annotations and unreachable.
	Candidate func(*corev1.Node) bool
	// Changed is called with a node whose Withdrawn answer changed.
	Changed func(node string)
	// Recorder records the verdicts as Events on the Node when Announce
	// says so (in the leader; every replica evaluates, since every replica
	// answers admission reviews). Either may be nil.
	Recorder record.EventRecorder
	Announce func() bool
	Metrics  *Metrics // may be nil
	Log      *slog.Logger

	// verdicts is the latest evaluation's, replaced whole by each: readers
	// (the webhooks) never wait for an evaluation.
	verdicts atomic.Pointer[map[string]verdict]

	mu     sync.Mutex // serializes evaluations; guards the fields below
	seen   map[string]sighting
	primed bool // an evaluation has run: Leases seen since are new writes
}

// DefaultValidity is Tracker.Validity's default: three of the outposts'
// default report intervals.
const DefaultValidity = 30 * time.Second

// sighting is when this process saw a report Lease at a resourceVersion.
type sighting struct {
	rv string
	at time.Time // zero: present at the first evaluation, written at an unknown time
}

// Withdrawn reports whether autonomy is withdrawn from node: a quorum of
// its peers has reported it unreachable for longer than the grace period.
func (t *Tracker) Withdrawn(node string) bool {
	s, _ := t.Verdict(node)
	return s == Withdrawn
}

// Verdict returns the current state of node and its evidence.
func (t *Tracker) Verdict(node string) (State, Evidence) {
	vs := t.verdicts.Load()
	if vs == nil {
		return Unknown, Evidence{}
	}
	v, ok := (*vs)[node]
	if !ok {
		return Unknown, Evidence{}
	}
	return v.state, v.evidence
}

// Run evaluates every Interval until ctx is done. The listers' informers
// must have synced.
func (t *Tracker) Run(ctx context.Context) error {
	interval := t.Interval
	if interval <= 0 {
		interval = time.Second
	}
	t.Log.Info("peer verdicts on", "siteLabel", t.SiteLabel, "grace", t.Grace, "reportValidity", t.validity(),
		"quorum", "majority of the site's other nodes, at least 2")
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		if err := t.Evaluate(time.Now()); err != nil {
			t.Log.Error("evaluating peer reports", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func (t *Tracker) validity() time.Duration {
	if t.Validity > 0 {
		return t.Validity
	}
	return DefaultValidity
}

// Evaluate brings every verdict up to date with the listers at now, which
// must not go back between calls.
func (t *Tracker) Evaluate(now time.Time) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	nodes, err := t.Nodes.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("listing nodes: %w", err)
	}
	leases, err := t.Reports.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("listing reports: %w", err)
	}
	v := view{sites: make(map[string]string, len(nodes)), members: map[string]int{}, reports: map[string]peer.Report{}}
	for _, n := range nodes {
		site := n.Labels[t.SiteLabel]
		v.sites[n.Name] = site
		if site != "" {
			v.members[site]++
		}
	}
	reports := map[string]int{}
	seen := make(map[string]sighting, len(leases))
	for _, l := range leases {
		// Freshness on this process's clock: from when it saw the report
		// written. A Lease already there at the first evaluation was
		// written at an unknown time, and counts from its next write.
		s, known := t.seen[l.Name]
		switch {
		case !known && !t.primed:
			s = sighting{rv: l.ResourceVersion}
		case !known || s.rv != l.ResourceVersion:
			s = sighting{rv: l.ResourceVersion, at: now}
		}
		seen[l.Name] = s
		r, err := peer.ParseReport(l)
		switch _, isNode := v.sites[l.Name]; {
		case err != nil:
			reports["malformed"]++
		case !isNode:
			reports["not_a_node"]++
		case s.at.IsZero() || !now.Before(s.at.Add(min(r.Valid, t.validity()))):
			reports["stale"]++
		default:
			reports["valid"]++
			v.reports[r.Observer] = r
		}
	}
	t.seen, t.primed = seen, true
	v.index()

	counts := map[State]int{}
	otherSite, withdrawals := 0, 0
	var changed []string
	var prev map[string]verdict
	if p := t.verdicts.Load(); p != nil {
		prev = *p
	}
	cur := make(map[string]verdict, len(prev))
	type announcement struct {
		n        *corev1.Node
		old, cur verdict
	}
	var announce []announcement
	for _, n := range nodes {
		if !t.Candidate(n) {
			continue
		}
		judged, ev := v.judge(n.Name)
		otherSite += len(ev.OtherSite)
		old := prev[n.Name]
		c := next(old, judged, ev, now, t.Grace)
		cur[n.Name] = c
		counts[c.state]++
		if (old.state == Withdrawn) != (c.state == Withdrawn) {
			changed = append(changed, n.Name)
			if c.state == Withdrawn {
				withdrawals++
			}
		}
		if old.state != c.state && !(old.state == "" && c.state == Unknown) {
			announce = append(announce, announcement{n, old, c})
		}
	}
	t.verdicts.Store(&cur)
	for _, a := range announce {
		t.announce(a.n, a.old, a.cur)
	}
	for name, old := range prev {
		if _, ok := cur[name]; !ok && old.state == Withdrawn {
			changed = append(changed, name)
			t.Log.Info("autonomy resumed: node reachable again, or no longer autonomous", "node", name)
			if n, err := t.Nodes.Get(name); err == nil {
				t.event(n, corev1.EventTypeNormal, ReasonAutonomyResume, "The cloud hears from it again, or it is no longer autonomous: peer verdict cleared")
			}
		}
	}

	t.Metrics.set(counts, reports, otherSite)
	if t.Metrics != nil {
		t.Metrics.withdrawals.Add(float64(withdrawals))
	}
	for _, name := range changed {
		if t.Changed != nil {
			t.Changed(name)
		}
	}
	return nil
}

// announce logs a change of verdict and records it on the Node.
func (t *Tracker) announce(n *corev1.Node, old, cur verdict) {
	ev := cur.evidence
	t.Log.Info("peer verdict", "node", n.Name, "from", string(old.state), "to", string(cur.state), "site", ev.Site,
		"reachableBy", ev.Reachable, "unreachableBy", ev.Unreachable, "quorum", ev.Quorum, "peers", ev.Peers, "ignoredOtherSite", ev.OtherSite)
	switch cur.state {
	case Alive:
		reason := ReasonPeersReach
		if old.state == Withdrawn {
			reason = ReasonAutonomyResume
		}
		t.event(n, corev1.EventTypeNormal, reason, fmt.Sprintf(
			"Reached by its peers at site %s (%s): cut off from the cloud, not down; autonomy keeps its pods", ev.Site, strings.Join(ev.Reachable, ", ")))
	case Dead:
		t.event(n, corev1.EventTypeWarning, ReasonPeersCannot, fmt.Sprintf(
			"%d of its %d peers at site %s cannot reach it (%s; quorum %d): autonomy is withdrawn in %v unless that changes",
			len(ev.Unreachable), ev.Peers, ev.Site, strings.Join(ev.Unreachable, ", "), ev.Quorum, t.Grace))
	case Withdrawn:
		t.event(n, corev1.EventTypeWarning, ReasonWithdrawn, fmt.Sprintf(
			"Its peers at site %s (%s) have not reached it for %v: autonomy withdrawn, its pods are evicted as on any node",
			ev.Site, strings.Join(ev.Unreachable, ", "), t.Grace))
	}
}

func (t *Tracker) event(n *corev1.Node, typ, reason, msg string) {
	if t.Recorder == nil || (t.Announce != nil && !t.Announce()) {
		return
	}
	// Events on a Node refer to it by name, as kubelet's and the node
	// lifecycle controller's do (kubectl describe node finds them so).
	ref := &corev1.ObjectReference{Kind: "Node", Name: n.Name, UID: n.UID}
	t.Recorder.Event(ref, typ, reason, msg)
}

// Metrics are the verdicts' Prometheus metrics.
type Metrics struct {
	verdicts    *prometheus.GaugeVec
	reports     *prometheus.GaugeVec
	otherSite   prometheus.Gauge
	withdrawals prometheus.Counter
}

// NewMetrics returns the metrics, registered with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	const ns = "outpost_controller"
	m := &Metrics{
		verdicts: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "peer_verdicts",
			Help: "Unreachable autonomous nodes by their peers' verdict: alive (a peer reaches it), dead (a quorum cannot, within the grace period), withdrawn (autonomy withdrawn), unknown (no quorum: autonomy as before)."},
			[]string{"verdict"}),
		reports: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "peer_reports",
			Help: "Peer report Leases by status: valid, stale, malformed, not_a_node (named after no Node)."},
			[]string{"status"}),
		otherSite: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "peer_reports_other_site",
			Help: "Observations of unreachable autonomous nodes made by nodes of another site, which do not count."}),
		withdrawals: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "autonomy_withdrawals_total",
			Help: "Times autonomy was withdrawn from a node because a quorum of its peers reported it unreachable for the grace period."}),
	}
	reg.MustRegister(m.verdicts, m.reports, m.otherSite, m.withdrawals)
	m.set(nil, nil, 0)
	return m
}

func (m *Metrics) set(verdicts map[State]int, reports map[string]int, otherSite int) {
	if m == nil {
		return
	}
	for _, s := range States {
		m.verdicts.WithLabelValues(string(s)).Set(float64(verdicts[s]))
	}
	for _, s := range []string{"valid", "stale", "malformed", "not_a_node"} {
		m.reports.WithLabelValues(s).Set(float64(reports[s]))
	}
	m.otherSite.Set(float64(otherSite))
}
