// Package converge brings a node back to the cloud's truth when the cloud
// returns after an outage: what kubelet believes it saved offline (Node and
// pod statuses) is sent upstream, the local overlays go, the journal of
// events written offline is replayed, and, after an outage longer than a
// flap, every cached view is re-listed so that objects that vanished
// upstream leave the cache even for clients that stay quiet.
package converge

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/report"
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
	// Views a whole answer replaced after since (clients re-listed them
	// when the link returned) are not asked again.
	Relist func(ctx context.Context, identity string, rate int, upstream http.RoundTripper, since time.Time) (int, error)
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
	// RelistHeadStart is how long after the link returned re-listing
	// begins: the time clients get to re-list the views they use.
	RelistHeadStart time.Duration
	// JournalRate bounds events replayed a second. Default 20.
	JournalRate int
	// Tokens returns the token each user last called with (see
	// identity.Tokens): their views are re-listed with it, so that quiet
	// callers converge too. Nil: only the node's views are re-listed.
	Tokens  func() map[string]string
	Metrics *metrics.Metrics // optional
	Log     *slog.Logger

	// relistOwed is set while a re-list after a long outage has not
	// ended: a link that fails again cuts it short, and the next return
	// finishes it whatever the outage (Run's goroutine only).
	relistOwed bool

	mu    sync.Mutex // guards the fields below
	since time.Time  // when the current state began
	last  *report.Reconnect
}

// Status returns when the current online or offline state began (for the
// first, when Run started) and what the last return of the cloud did (nil
// before the first).
func (c *Converger) Status() (since time.Time, last *report.Reconnect) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.last != nil {
		l := *c.last
		last = &l
	}
	return c.since, last
}

// record updates the last reconnect's figures.
func (c *Converger) record(update func(r *report.Reconnect)) {
	c.mu.Lock()
	update(c.last)
	c.mu.Unlock()
}

// Run follows the state until ctx is done, converging at each return of
// the cloud. A start offline counts as a long outage.
func (c *Converger) Run(ctx context.Context) error {
	wasOnline := c.Online()
	offlineSince := time.Now()
	c.mu.Lock()
	c.since = offlineSince
	c.mu.Unlock()
	for {
		changed := c.Changed()
		online := c.Online()
		if online != wasOnline {
			c.mu.Lock()
			c.since = time.Now()
			c.mu.Unlock()
		}
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
	back := time.Now()
	c.mu.Lock()
	c.last = &report.Reconnect{At: back, Outage: outage}
	c.mu.Unlock()
	var failed error
	defer func() {
		c.record(func(r *report.Reconnect) {
			r.Done = time.Now()
			if failed != nil {
				r.Error = failed.Error()
			}
		})
	}()
	asNode := c.Upstream(c.Node)
	sent, err := c.Local.ReplayStatus(ctx, asNode)
	c.record(func(r *report.Reconnect) { r.StatusesSent = sent })
	if err != nil {
		failed = fmt.Errorf("re-sending local statuses: %w", err)
		c.Log.Warn("re-sending local statuses stopped", "sent", sent, "err", err)
	} else if sent > 0 {
		c.Log.Info("local node and pod statuses sent to the apiserver", "count", sent)
	}
	c.Local.DropOverlays()
	rate := c.JournalRate
	if rate <= 0 {
		rate = 20
	}
	n, err := c.Local.ReplayJournal(ctx, rate, asNode)
	c.record(func(r *report.Reconnect) { r.EventsReplayed = n })
	if c.Metrics != nil {
		c.Metrics.JournalReplayed.Add(float64(n))
	}
	if err != nil {
		failed = fmt.Errorf("replaying the event journal: %w", err)
		c.Log.Warn("event journal replay stopped; the rest waits for the next reconnect", "replayed", n, "err", err)
	} else if n > 0 {
		c.Log.Info("event journal replayed", "events", n)
	}
	if outage < c.FlapWindow && !c.relistOwed {
		return
	}
	c.relistOwed = true
	// Clients whose watches broke re-list first (informers do within a
	// second or two): the views they refresh need no re-list of ours.
	select {
	case <-ctx.Done():
		return
	case <-time.After(c.RelistHeadStart):
	}
	start := time.Now()
	n, err = c.Relist(ctx, c.Node.Key(), c.RelistRate, asNode, back)
	var tokens map[string]string
	if c.Tokens != nil {
		tokens = c.Tokens()
	}
	for user, token := range tokens {
		if err != nil {
			break
		}
		var m int
		m, err = c.Relist(ctx, user, c.RelistRate, c.Upstream(request.Identity{Kind: request.BearerToken, User: user, Token: token}), back)
		n += m
	}
	c.record(func(r *report.Reconnect) { r.ViewsRelisted = n })
	c.relistOwed = err != nil
	if err != nil && ctx.Err() == nil {
		failed = fmt.Errorf("re-listing views: %w", err)
		c.Log.Warn("re-listing after reconnect stopped", "views", n, "err", err)
	} else {
		c.Log.Info("re-listed cached views after reconnect", "views", n, "took", time.Since(start).Round(time.Millisecond))
	}
}
