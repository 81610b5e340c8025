// Package converge brings a node back to the cloud's truth when the cloud
// returns after an outage: what kubelet believes it saved offline (Node and
// pod statuses) is sent upstream, the local overlays go, the journal of
// events written offline is replayed, and, after an outage longer than a
// flap, every cached view is re-listed so that objects that vanished
// upstream leave the cache even for clients that stay quiet.
package converge

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/request"
)

// Local is what converging needs of this node's local writes (package
// local).
type Local interface {
	// ReplayStatus sends the last local Node and pod statuses upstream.
	ReplayStatus(ctx context.Context, upstream http.RoundTripper) (int, error)
	// DropOverlays forgets every local write.
	DropOverlays()
	// ReplayJournal posts the events journaled offline.
	ReplayJournal(ctx context.Context, rate int, upstream http.RoundTripper) (int, error)
}

// Converger follows the online/offline state and converges when the cloud
// returns. Set the fields, then Run it.
type Converger struct {
	Local Local
	// Relist refreshes every view of identity from the apiserver through
	// upstream (recorder.Recorder.Relist).
	Relist func(ctx context.Context, identity string, rate int, upstream http.RoundTripper) (int, error)
	// Upstream sends requests of outpost's own as an identity (see
	// upstream.Pool.As).
	Upstream func(request.Identity) http.RoundTripper
	// Node is this node's identity: its statuses, events and views go
	// upstream with its credentials.
	Node request.Identity
	// Online and Changed are the online/offline state (health.Monitor).
	Online  func() bool
	Changed func() <-chan struct{}
	// FlapWindow is the outage below which views are not re-listed.
	FlapWindow time.Duration
	// RelistRate bounds views re-listed a second, per identity.
	RelistRate int
	// JournalRate bounds events replayed a second. Default 20.
	JournalRate int
	// Tokens returns the token each user last called with (see
	// identity.Tokens): their views are re-listed with it, so that quiet
	// callers converge too. Nil: only the node's views are re-listed.
	Tokens  func() map[string]string
	Metrics *metrics.Metrics // optional
	Log     *slog.Logger
}

// Run follows the state until ctx is done, converging at each return of
// the cloud. A start offline counts as a long outage.
func (c *Converger) Run(ctx context.Context) error {
	wasOnline := c.Online()
	offlineSince := time.Now()
	for {
		changed := c.Changed()
		online := c.Online()
		switch {
		case online == wasOnline:
		case !online:
			offlineSince = time.Now()
			c.Log.Warn("cloud unreachable: answering from the cache")
		default:
			c.converge(ctx, time.Since(offlineSince))
		}
		wasOnline = online
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// converge runs the steps of a return after an outage of the given length.
func (c *Converger) converge(ctx context.Context, outage time.Duration) {
	c.Log.Info("cloud reachable again", "outage", outage.Round(time.Millisecond))
	asNode := c.Upstream(c.Node)
	if n, err := c.Local.ReplayStatus(ctx, asNode); err != nil {
		c.Log.Warn("re-sending local statuses stopped", "sent", n, "err", err)
	} else if n > 0 {
		c.Log.Info("local node and pod statuses sent to the apiserver", "count", n)
	}
	c.Local.DropOverlays()
	rate := c.JournalRate
	if rate <= 0 {
		rate = 20
	}
	n, err := c.Local.ReplayJournal(ctx, rate, asNode)
	if c.Metrics != nil {
		c.Metrics.JournalReplayed.Add(float64(n))
	}
	if err != nil {
		c.Log.Warn("event journal replay stopped; the rest waits for the next reconnect", "replayed", n, "err", err)
	} else if n > 0 {
		c.Log.Info("event journal replayed", "events", n)
	}
	if outage < c.FlapWindow {
		return
	}
	start := time.Now()
	n, err = c.Relist(ctx, c.Node.Key(), c.RelistRate, asNode)
	var tokens map[string]string
	if c.Tokens != nil {
		tokens = c.Tokens()
	}
	for user, token := range tokens {
		if err != nil {
			break
		}
		var m int
		m, err = c.Relist(ctx, user, c.RelistRate, c.Upstream(request.Identity{Kind: request.BearerToken, User: user, Token: token}))
		n += m
	}
	if err != nil && ctx.Err() == nil {
		c.Log.Warn("re-listing after reconnect stopped", "views", n, "err", err)
	} else {
		c.Log.Info("re-listed cached views after reconnect", "views", n, "took", time.Since(start).Round(time.Millisecond))
	}
}
