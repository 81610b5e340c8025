package share

import (
	"context"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// A grant is what the reader is told of a caller served from another
// identity's stream: the scope it was allowed, the view that answered it,
// and the resourceVersion up to which it was served. Offline the reader
// answers it that view no newer than that version (the pin), so that a
// caller that lost its access online (a pod deleted, its node no longer
// allowed its Secrets) is not answered, offline, what changed after: as
// with its own view, which would hold what it was last served.
//
// A pin moves as the caller is served: at each list, and while its
// watches are open, to the stream's version (everything up to it is sent
// or being sent to them). It is written at once for a new grant, and
// otherwise every pinEvery, when the link goes down, when a watch ends
// and when outpost stops; a crash loses at most pinEvery, and offline the
// objects changed in it are left out for that caller rather than shown.
type grantKey struct {
	identity string
	asked    store.ViewKey
}

type grantState struct {
	source  store.ViewKey
	st      *stream
	rv      uint64 // the pin the reader has
	pending uint64 // the pin to write
	watches int    // the caller's watches being served from st
}

// pinEvery is how often moved pins are written.
const pinEvery = 10 * time.Second

// remember notes that info's caller is served from st, when st is not its
// own view, and reports its grant.
func (c *Cache) remember(info *request.Info, st *stream) (grantKey, bool) {
	asked, id := scopeOf(info), info.Identity.Key()
	if c.Grant == nil || (id == st.owner && asked == st.scope) || (c.Recorded != nil && !c.Recorded(id)) {
		// Its own view, or a caller --record-identities leaves out,
		// which nothing answers offline.
		return grantKey{}, false
	}
	source := st.scope
	source.Identity = st.owner
	k := grantKey{id, asked}
	rv := st.version()
	c.mu.Lock()
	g := c.grants[k]
	if g != nil && g.source == source {
		g.st = st // the scope's stream now, if it started again
		g.pending = max(g.pending, rv)
		c.mu.Unlock()
		return k, true
	}
	c.mu.Unlock()
	// New, or from another stream now: written before it serves, so that
	// the caller has it offline at once.
	c.grantMu.Lock()
	defer c.grantMu.Unlock()
	c.mu.Lock()
	g = c.grants[k]
	if g == nil {
		g = &grantState{}
		c.grants[k] = g
	}
	g.source, g.st, g.rv, g.pending = source, st, rv, rv
	c.mu.Unlock()
	c.Grant(id, asked, source, rv, true)
	return k, true
}

// watching counts a watch of grant k's caller that begins, and returns
// what to call when it ends: the pin then moves to what the stream has
// sent. A grant taken back and given again meanwhile is a new one, which
// the watch's end leaves alone.
func (c *Cache) watching(k grantKey) (end func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	g := c.grants[k]
	if g == nil {
		return func() {}
	}
	g.watches++
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		g.watches--
		if c.grants[k] == g {
			g.pending = max(g.pending, g.st.version())
		}
	}
}

// forget tells Grant that info's caller may no longer read its scope.
func (c *Cache) forget(info *request.Info) {
	if c.Grant == nil {
		return
	}
	k := grantKey{info.Identity.Key(), scopeOf(info)}
	c.grantMu.Lock()
	defer c.grantMu.Unlock()
	c.mu.Lock()
	delete(c.grants, k)
	c.mu.Unlock()
	// Also when this process never granted it: the store keeps grants of
	// earlier runs.
	c.Grant(k.identity, k.asked, store.ViewKey{}, 0, false)
}

// keepPins writes moved pins every pinEvery and when the link goes down,
// until ctx ends, and once more then; and reviews the stored grants
// again a while after the link comes back (regrantDelay).
func (c *Cache) keepPins(ctx context.Context) {
	t := time.NewTicker(pinEvery)
	defer t.Stop()
	var recheck <-chan time.Time
	var back time.Time // when the link last came back
	due := false       // a review came due while the link was down
	if c.online() {
		back = time.Now()
		recheck = time.After(regrantDelay(c.Recheck))
	}
	for {
		var changed <-chan struct{}
		if c.Changed != nil {
			changed = c.Changed()
		}
		select {
		case <-ctx.Done():
			c.writePins()
			return
		case <-t.C:
		case <-changed:
			switch {
			case !c.online():
			case due:
				// It came due while the link was down: soon, not a
				// whole delay later (a link that keeps dropping would
				// never see it).
				back, due = time.Now(), false
				recheck = time.After(regrantDelay(c.Recheck) / 4)
			case recheck == nil:
				back = time.Now()
				recheck = time.After(regrantDelay(c.Recheck))
			}
		case <-recheck:
			recheck = nil
			if c.online() {
				c.reviewGrants(ctx, back)
			} else {
				due = true
			}
		}
		c.writePins()
	}
}

// regrantDelay is how long after the link comes back the stored grants are
// reviewed: callers served meanwhile are reviewed anyway (and so skipped),
// and a fleet back at once does not ask all at once.
func regrantDelay(recheck time.Duration) time.Duration {
	d := recheck / 4
	return d + time.Duration(rand.Int64N(int64(d)+1))
}

// reviewGrants asks the apiserver again, with the credentials outpost
// holds for each grant's caller, whether it may still list the scope it
// was granted, unless an answer since the link came back (at back) said
// so; a no takes the grant back. A caller whose credentials
// outpost does not hold (it has not asked since outpost started) keeps its
// grant until it asks.
func (c *Cache) reviewGrants(ctx context.Context, back time.Time) {
	if c.Grants == nil || c.Grant == nil {
		return
	}
	var all []grantKey
	if err := c.Grants(func(identity string, asked store.ViewKey) error {
		all = append(all, grantKey{identity, asked})
		return nil
	}); err != nil {
		c.Log.Warn("watch cache: cannot read the stored grants to review them", "err", err)
		return
	}
	for _, g := range all {
		if ctx.Err() != nil || !c.online() {
			return
		}
		if c.reviewedSince(g.identity, g.asked, back) {
			continue
		}
		rt := c.UpstreamAs(g.identity)
		if rt == nil {
			continue
		}
		info, ok := infoOf(g.asked)
		if !ok {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, reviewTimeout)
		allowed, err := c.reviewAs(rctx, rt, info, "list")
		cancel()
		if err != nil {
			// No answer says nothing; nor does a 401 (the token outpost
			// holds is dead, and the user's others may not be).
			continue
		}
		if c.Metrics != nil {
			c.Metrics.WatchCacheReviews.WithLabelValues(map[bool]string{true: "allowed", false: "denied"}[allowed]).Inc()
		}
		if !allowed {
			c.Log.Info("watch cache: a stored grant is taken back", "identity", g.identity, "scope", describe(g.asked))
			c.grantMu.Lock()
			c.mu.Lock()
			delete(c.grants, g)
			// Its kept yeses go too: the next request asks.
			c.dropAnswers(g.identity, g.asked, reviewKey{})
			c.mu.Unlock()
			c.Grant(g.identity, g.asked, store.ViewKey{}, 0, false)
			c.grantMu.Unlock()
		}
	}
}

// reviewedSince reports whether the apiserver allowed identity to read
// asked, with any of its credentials and verbs, since t.
func (c *Cache) reviewedSince(identity string, asked store.ViewKey, t time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, rv := range c.reviews {
		if k.user == identity && k.scope == asked && isClosed(rv.done) && rv.verdict == allowed && !rv.at.Before(t) {
			return true
		}
	}
	return false
}

// infoOf is a request of asked, as a review of it needs, parsed as any
// request is.
func infoOf(asked store.ViewKey) (*request.Info, bool) {
	if strings.HasSuffix(asked.Resource, "#meta") {
		return nil, false
	}
	path, err := request.ViewURL(asked)
	if err != nil {
		return nil, false
	}
	r, err := http.NewRequest(http.MethodGet, "https://upstream"+path, nil)
	if err != nil {
		return nil, false
	}
	info, err := request.Parse(r, request.Identity{})
	return info, err == nil && info.Fields != nil
}

// writePins writes the pins that moved: to the stream's version for the
// grants whose caller watches.
func (c *Cache) writePins() {
	if c.Grant == nil {
		return
	}
	c.grantMu.Lock()
	defer c.grantMu.Unlock()
	type put struct {
		k      grantKey
		source store.ViewKey
		rv     uint64
	}
	var puts []put
	c.mu.Lock()
	for k, g := range c.grants {
		if g.watches > 0 {
			g.pending = max(g.pending, g.st.version())
		}
		if g.pending > g.rv {
			g.rv = g.pending
			puts = append(puts, put{k, g.source, g.rv})
		}
	}
	c.mu.Unlock()
	// Under grantMu: a forget cannot come between the copy and the write.
	for _, p := range puts {
		c.Grant(p.k.identity, p.k.asked, p.source, p.rv, true)
	}
}
