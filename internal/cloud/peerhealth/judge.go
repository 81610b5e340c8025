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
	for observer, r := range v.reports {
		if observer == node {
			continue
		}
		reached, unreached := slices.Contains(r.Reachable, node), slices.Contains(r.Unreachable, node)
		if !reached && !unreached {
			continue
		}
		if v.sites[observer] != site {
			ev.OtherSite = append(ev.OtherSite, observer)
			continue
		}
		if reached {
			ev.Reachable = append(ev.Reachable, observer)
		} else {
			ev.Unreachable = append(ev.Unreachable, observer)
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
func next(prev verdict, judged State, ev Evidence, now time.Time, grace time.Duration) verdict {
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
