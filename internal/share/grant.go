package share

import (
	"context"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/outposthq/outpost/internal/reader"
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
// A pin moves only with what was written to the caller: a list's
// version once the list was written, a watch's once its events up to it
// were. A new grant is written at once then; moved pins every pinEvery,
// all in one transaction, when the link goes down and when outpost
// stops; a crash loses at most pinEvery, and offline the objects changed
// in it are left out for that caller rather than shown. A grant whose
// stream ended and which no watch follows leaves memory once its pin is
// written; the store keeps it, for offline answers and the review after
// a reconnect.
type grantKey struct {
	identity string
	asked    store.ViewKey
}

// grantState is a grant as this process last told it. It is replaced,
// never reused, when the grant is taken back or comes from another view:
// the pointer is the grant's generation, so that a pin moved by a watch
// of an older one, or written after it was taken back, is left out.
type grantState struct {
	source  store.ViewKey
	st      *stream
	rv      uint64 // the pin the reader has
	pending uint64 // the pin to write
	watches int    // the caller's watches following it
}

// pinEvery is how often moved pins are written.
const pinEvery = 10 * time.Second

// A pin follows one request served from another identity's stream: what
// is written to the caller moves its grant's pin. A nil pin follows
// nothing (the caller's own view, or no grants kept).
type pin struct {
	c      *Cache
	k      grantKey
	source store.ViewKey
	st     *stream
	since  uint64 // denials counted before the request was admitted
	watch  bool
	g      *grantState // once something was written
	last   uint64      // the last version served: a watch's wakes that moved nothing take no lock
}

// denialMark counts the denials so far; remember takes it from before the
// admission its request follows.
func (c *Cache) denialMark() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.denials
}

// deniedSince reports whether k was denied after mark (or may have been:
// the denials before deniedFloor are no longer told apart); c.mu is held.
func (c *Cache) deniedSince(k grantKey, mark uint64) bool {
	return c.denied[k] > mark || c.deniedFloor > mark
}

// remember returns the pin of info's request served from st, admitted
// after denial mark since, or nil when st is its own view or a caller
// --record-identities leaves out (which nothing answers offline).
func (c *Cache) remember(info *request.Info, st *stream, since uint64) *pin {
	asked, id := scopeOf(info), info.Identity.Key()
	// The owner reads its own view: offline, its broader view answers it
	// as any of its views does, whole, with no pin to cut it short.
	if c.Grant == nil || id == st.owner || (c.Recorded != nil && !c.Recorded(id)) {
		return nil
	}
	source := st.scope
	source.Identity = st.owner
	return &pin{c: c, k: grantKey{id, asked}, source: source, st: st, since: since, watch: info.Watch}
}

// served notes that the caller was written everything of its scope up to
// resourceVersion rv. The first time, the grant is written if it is new,
// unless a denial of the caller came after its admission: the answer it
// was admitted on is no longer the apiserver's.
func (p *pin) served(rv uint64) {
	if p == nil || (p.g != nil && rv <= p.last) {
		return
	}
	p.last = rv
	c := p.c
	c.mu.Lock()
	if p.g != nil {
		if c.grants[p.k] == p.g {
			p.g.pending = max(p.g.pending, rv)
		}
		c.mu.Unlock()
		return
	}
	if p.join(rv) {
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	// New, or from another view now: written at once, so that the caller
	// has it offline. grantMu orders it with a denial's delete.
	c.grantMu.Lock()
	defer c.grantMu.Unlock()
	c.mu.Lock()
	if p.join(rv) {
		c.mu.Unlock()
		return
	}
	if c.deniedSince(p.k, p.since) {
		c.mu.Unlock()
		return
	}
	p.g = &grantState{source: p.source, st: p.st, rv: rv, pending: rv}
	if p.watch {
		p.g.watches++
	}
	c.grants[p.k] = p.g
	c.mu.Unlock()
	c.Grant(p.k.identity, p.k.asked, p.source, rv, true)
}

// join makes p follow the grant this process holds already, if it is of
// p's view and no denial came after p's admission; c.mu is held.
func (p *pin) join(rv uint64) bool {
	g := p.c.grants[p.k]
	if g == nil || g.source != p.source || p.c.deniedSince(p.k, p.since) {
		return false
	}
	g.st = p.st // the scope's stream now, if it started again
	g.pending = max(g.pending, rv)
	if p.watch {
		g.watches++
	}
	p.g = g
	return true
}

// end notes that p's watch ended.
func (p *pin) end() {
	if p == nil || p.g == nil || !p.watch {
		return
	}
	p.c.mu.Lock()
	p.g.watches--
	p.c.mu.Unlock()
}

// forget tells Grant that info's caller may no longer read its scope.
func (c *Cache) forget(info *request.Info) {
	c.takeBack(grantKey{info.Identity.Key(), scopeOf(info)}, false)
}

// maxDenied bounds the denials remembered apart; past it they are
// forgotten at once, and a request admitted before then writes no new
// grant (its next one will).
const maxDenied = 1024

// takeBack tells Grant that k's caller may no longer read its scope, and
// marks the denial, so that a request admitted before it writes no grant
// after. dropAnswers also forgets the caller's kept answers for it.
func (c *Cache) takeBack(k grantKey, dropAnswers bool) {
	if c.Grant == nil {
		return
	}
	c.mu.Lock()
	c.denials++
	if len(c.denied) >= maxDenied {
		clear(c.denied)
		c.deniedFloor = c.denials
	}
	c.denied[k] = c.denials
	delete(c.grants, k)
	if dropAnswers {
		c.dropAnswers(k.identity, k.asked, reviewKey{})
	}
	c.mu.Unlock()
	c.grantMu.Lock()
	defer c.grantMu.Unlock()
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
			// Its kept yeses go too: the next request asks.
			c.takeBack(g, true)
		}
	}
}

// reviewedSince reports whether the apiserver allowed identity to read
// asked, with any of its credentials and verbs, since t.
func (c *Cache) reviewedSince(identity string, asked store.ViewKey, t time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rv := range c.answers[grantKey{identity, asked}] {
		if isClosed(rv.done) && rv.verdict == allowed && !rv.at.Before(t) {
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

// writePins writes the pins that moved, in one transaction, without
// holding grantMu: a grant taken back or given again meanwhile is left
// out, as Pins asks inside its transaction whether each is still the one
// this process holds. Then grants whose stream ended and which no watch
// follows leave memory, their pins written.
func (c *Cache) writePins() {
	if c.Grant == nil {
		return
	}
	type moved struct {
		k grantKey
		g *grantState
	}
	var ms []moved
	var pins []reader.Grant
	c.mu.Lock()
	for k, g := range c.grants {
		if g.pending > g.rv {
			ms = append(ms, moved{k, g})
			pins = append(pins, reader.Grant{Identity: k.identity, Asked: k.asked, Source: g.source, RV: g.pending})
		}
	}
	c.mu.Unlock()
	current := func(i int) bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.grants[ms[i].k] == ms[i].g
	}
	if err := c.putPins(pins, current); err != nil {
		if !c.pinsFailing.Swap(true) {
			c.Log.Warn("watch cache: cannot write how far callers were served; retrying every period", "pins", len(pins), "err", err)
		}
		return
	}
	if c.pinsFailing.Swap(false) {
		c.Log.Info("watch cache: how far callers were served is written again", "pins", len(pins))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, m := range ms {
		m.g.rv = max(m.g.rv, pins[i].RV)
	}
	for k, g := range c.grants {
		if g.watches == 0 && g.pending <= g.rv && isClosed(g.st.endedCh) {
			delete(c.grants, k)
		}
	}
}

// putPins writes pins with Pins, or one by one with Grant, under grantMu,
// when Pins is not set.
func (c *Cache) putPins(pins []reader.Grant, current func(i int) bool) error {
	if len(pins) == 0 {
		return nil
	}
	if c.Pins != nil {
		return c.Pins(pins, current)
	}
	c.grantMu.Lock()
	defer c.grantMu.Unlock()
	for i, p := range pins {
		if current(i) {
			c.Grant(p.Identity, p.Asked, p.Source, p.RV, true)
		}
	}
	return nil
}
