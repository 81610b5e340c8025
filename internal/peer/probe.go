package peer

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"time"
)

// ProbePath is what a probe asks for; the answer is the node's name.
const ProbePath = "/peer/healthz"

// peerState is what this node knows of one peer.
type peerState struct {
	address  string
	failures int       // consecutive failed probes
	probed   time.Time // end of the last probe; zero before the first
	reached  bool      // the last probe succeeded
}

// prober probes the peers of one site, Fanout at a time, in turn.
type prober struct {
	cert      GetCertificate
	ca        *x509.CertPool
	timeout   time.Duration
	fanout    int
	threshold int
	observe   func(reached bool) // each probe's result; may be nil

	mu    sync.Mutex // guards the fields below
	peers map[string]*peerState
	order []string // a random permutation of the peers' names
	next  int      // index in order of the next peer to probe
}

// setPeers replaces the set of peers (name → address). A peer that stays
// at the same address keeps what was learned of it; the order is shuffled
// again when the set changes, so that observers do not probe in step.
func (p *prober) setPeers(addrs map[string]string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	changed := len(addrs) != len(p.peers)
	next := make(map[string]*peerState, len(addrs))
	for name, addr := range addrs {
		if old, ok := p.peers[name]; ok && old.address == addr {
			next[name] = old
			continue
		}
		changed = true
		next[name] = &peerState{address: addr}
	}
	p.peers = next
	if !changed {
		return
	}
	p.order = p.order[:0]
	for name := range next {
		p.order = append(p.order, name)
	}
	rand.Shuffle(len(p.order), func(i, j int) { p.order[i], p.order[j] = p.order[j], p.order[i] })
	p.next = 0
}

// pick returns the next Fanout peers in turn, with their addresses.
func (p *prober) pick() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]string, p.fanout)
	for range min(p.fanout, len(p.order)) {
		name := p.order[p.next%len(p.order)]
		p.next = (p.next + 1) % len(p.order)
		out[name] = p.peers[name].address
	}
	return out
}

// round probes the next Fanout peers concurrently and records the results.
func (p *prober) round(ctx context.Context) {
	var wg sync.WaitGroup
	for name, addr := range p.pick() {
		wg.Go(func() {
			err := p.probe(ctx, name, addr)
			if ctx.Err() != nil {
				return // shutting down: says nothing about the peer
			}
			p.record(name, addr, err == nil, time.Now())
		})
	}
	wg.Wait()
}

func (p *prober) record(name, addr string, reached bool, at time.Time) {
	if p.observe != nil {
		p.observe(reached)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	st, ok := p.peers[name]
	if !ok || st.address != addr {
		return // the set changed while probing
	}
	st.probed, st.reached = at, reached
	if reached {
		st.failures = 0
	} else {
		st.failures++
	}
}

// probe asks peer at addr for ProbePath over mutual TLS, accepting only
// peer's node identity, and checks that the answer names it.
func (p *prober) probe(ctx context.Context, peer, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	tr := &http.Transport{TLSClientConfig: clientTLS(p.cert, p.ca, peer), DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+ProbePath, nil)
	if err != nil {
		return err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || string(body) != peer {
		return fmt.Errorf("probe of %s: %s %q", peer, resp.Status, body)
	}
	return nil
}

// seen returns the peers probed since `since`, reached at the last probe
// or failed threshold times in a row (a peer in between is in neither),
// and how many peers there are.
func (p *prober) seen(since time.Time) (reachable, unreachable []string, all int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for name, st := range p.peers {
		switch {
		case st.probed.Before(since):
		case st.reached:
			reachable = append(reachable, name)
		case st.failures >= p.threshold:
			unreachable = append(unreachable, name)
		}
	}
	slices.Sort(reachable)
	slices.Sort(unreachable)
	return reachable, unreachable, len(p.peers)
}

// rounds is how many rounds it takes to probe every peer once.
func (p *prober) rounds() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fanout <= 0 || len(p.order) == 0 {
		return 1
	}
	return (len(p.order) + p.fanout - 1) / p.fanout
}

// handler answers probes with this node's name; the TLS layer has already
// checked the caller's node identity.
func handler(node string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ProbePath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, node)
	})
	return mux
}
