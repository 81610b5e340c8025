package peerhealth

import (
	"slices"
	"time"

	"github.com/outposthq/outpost/internal/peer"
)

// State is the peers' verdict on one unreachable autonomous node.
type State string

const (
	Unknown   State = "unknown"   // no quorum either way: autonomy as before
	Alive     State = "alive"     // a peer at its site reaches it
	Dead      State = "dead"      // a quorum at its site cannot reach it, within the grace period
	Withdrawn State = "withdrawn" // dead for longer than the grace period: autonomy withdrawn
)

// States lists every State, for metrics.
var States = []State{Unknown, Alive, Dead, Withdrawn}

// Quorum is how many of the other nodes at a site must report a node
// unreachable: a majority of them, and never fewer than two, so that no
// single node can have another evicted. A site of two can never reach it.
func Quorum(peers int) int { return max(2, peers/2+1) }

// Evidence is what a verdict rests on, for events and logs.
type Evidence struct {
	// Site is the node's site, and Peers the number of other nodes there.
	Site   string
	Peers  int
	Quorum int
	// Reachable and Unreachable are the observers whose reports counted.
	Reachable, Unreachable []string
	// OtherSite are observers at another site that spoke of the node: not
	// counted.
	OtherSite []string
}

// view is the cluster as one evaluation sees it.
type view struct {
	sites   map[string]string      // node name → its site label ("" for none)
	members map[string]int         // site → number of nodes there
	reports map[string]peer.Report // observer → its valid, fresh report
	about   map[string][]said      // node → what reports say of it (index)
}

// said is one report's word on one node.
type said struct {
	observer string
	reached  bool
}

// index fills about from reports, so that judging a node reads only what
// is said of it.
func (v *view) index() {
	v.about = map[string][]said{}
	for observer, r := range v.reports {
		// Once per observer and node, however often a report names it.
		named := make(map[string]bool, len(r.Reachable)+len(r.Unreachable))
		for _, list := range []struct {
			names   []string
			reached bool
		}{{r.Reachable, true}, {r.Unreachable, false}} {
			for _, n := range list.names {
				if !named[n] {
					named[n] = true
					v.about[n] = append(v.about[n], said{observer, list.reached})
				}
			}
		}
	}
}

// judge returns the peers' verdict on node (Unknown, Alive or Dead) and its
// evidence.
func (v *view) judge(node string) (State, Evidence) {
	site := v.sites[node]
	if site == "" {
		return Unknown, Evidence{}
	}
	ev := Evidence{Site: site, Peers: v.members[site] - 1}
	ev.Quorum = Quorum(ev.Peers)
	for _, s := range v.about[node] {
		switch {
		case s.observer == node:
		case v.sites[s.observer] != site:
			ev.OtherSite = append(ev.OtherSite, s.observer)
		case s.reached:
			ev.Reachable = append(ev.Reachable, s.observer)
		default:
			ev.Unreachable = append(ev.Unreachable, s.observer)
		}
	}
	slices.Sort(ev.Reachable)
	slices.Sort(ev.Unreachable)
	slices.Sort(ev.OtherSite)
	switch {
	case len(ev.Reachable) > 0:
		return Alive, ev
	case len(ev.Unreachable) >= ev.Quorum:
		return Dead, ev
	default:
		return Unknown, ev
	}
}

// verdict is what is kept of one node between evaluations.
type verdict struct {
	state     State
	deadSince time.Time // when the quorum was first seen, while Dead or Withdrawn
	evidence  Evidence
}

// next is the verdict that follows prev, given this evaluation's judgement.
// Withdrawn holds through Unknown (the observers fell silent, the quorum
// shrank: no one says the node is back) until a peer reaches it; the node
// being heard from again ends it too, as it is then no candidate.
func next(prev verdict, judged State, ev Evidence, now time.Time, grace time.Duration) verdict {
	if prev.state == Withdrawn && judged == Unknown {
		return verdict{state: Withdrawn, deadSince: prev.deadSince, evidence: prev.evidence}
	}
	if judged != Dead {
		return verdict{state: judged, evidence: ev}
	}
	since := prev.deadSince
	if prev.state != Dead && prev.state != Withdrawn {
		since = now
	}
	state := Dead
	if now.Sub(since) >= grace {
		state = Withdrawn
	}
	return verdict{state: state, deadSince: since, evidence: ev}
}
