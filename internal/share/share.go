// Package share is outpost's node watch cache: one upstream list+watch per
// scope (resource, namespace, label and field selector) kept in memory,
// from which every local client the apiserver lets read that scope is
// answered online, as kube-apiserver answers from its own watch cache:
// LISTs at resourceVersion "0" or NotOlderThan a version the node holds,
// watches from such a version, and WatchLists (sendInitialEvents=true).
// Consistent reads (no resourceVersion) and everything else still go
// upstream.
//
// A stream runs with the credentials of the identity that first asked for
// its scope (the node's own, or the token that caller last used). Every
// caller, that one included, is served from a stream only after the
// apiserver said, to a SelfSubjectAccessReview made with the caller's own
// credentials, that it may list or watch the scope it asked for; the
// answer holds for Recheck, and a watch being served stops when a later
// check says no. A narrower request (more selective, one namespace) may be
// served from a broader stream, filtered here, since the caller was
// authorized for exactly what it asked.
//
// The stream's answers are recorded into the store once, through the same
// recorder that records clients' answers (as the view of the stream's
// owner), so offline serving, convergence and crash safety are what they
// were. The in-memory part is bounded by MaxBytes.
package share

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/reader"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// Defaults of Cache's fields.
const (
	DefaultMaxBytes = 64 << 20
	// DefaultRecheck is as long as kube-apiserver's webhook authorizer
	// keeps an allowed answer by default.
	DefaultRecheck  = 5 * time.Minute
	defaultWindow   = 2048
	defaultIdle     = 2 * time.Minute
	defaultBookmark = 10 * time.Second
	// waitSynced bounds how long a request waits for a new stream's first
	// list, or for a stream to reach the resourceVersion it asks for,
	// before it is sent upstream instead (the apiserver's watch cache
	// waits 3 s for the latter).
	waitSynced = 10 * time.Second
	waitFresh  = 3 * time.Second
	// refusedFor is how long a scope whose stream the apiserver refused,
	// or which outgrew the budget, is left to upstream.
	refusedFor = time.Minute
)

// Cache is the node watch cache. Set the fields, then call Run once;
// Serve answers nothing until Run has started.
type Cache struct {
	// As sends requests with the credentials of a caller: the node's own
	// for the node, its own token for a token caller. Required.
	As func(request.Identity) http.RoundTripper
	// UpstreamAs sends requests as the identity whose key is given, with
	// the credentials outpost holds for it now (a token caller's latest
	// token), or returns nil. A stream is owned only by an identity it
	// can send as. Required.
	UpstreamAs func(identity string) http.RoundTripper
	// Credential names the credentials UpstreamAs sends as identity now:
	// NodeCredential, a token's hash (request.Identity.TokenHash), or "".
	// A stream's owner is served without a review only with the
	// credential the apiserver last accepted for the stream. Nil: the
	// owner is reviewed like everyone.
	Credential func(identity string) string
	// Record, if set, records a stream's answers as they stream in
	// (recorder.Recorder.Tee).
	Record func(*http.Response, *request.Info)
	// Recorded, if set, reports whether Record records an identity's
	// answers (--record-identities). A caller recorded is not served from
	// the stream of an owner that is not, which leaves nothing to answer
	// it offline: its requests go upstream and are recorded as its own.
	Recorded func(identity string) bool
	// Grant, if set, is told that identity may read the scope it asked
	// from view source, another identity's, as it was served up to
	// resourceVersion rv (allowed), or no longer (!allowed), so that the
	// reader answers it offline from that view, no newer than rv
	// (reader.PutGrant).
	Grant func(identity string, asked, source store.ViewKey, rv uint64, allowed bool)
	// Pins, if set, writes the pins that moved in one transaction
	// (reader.PutGrants), each only if current(i) still says so inside
	// it, so that a grant taken back meanwhile (whose delete Grant is told
	// after current says no) is not written again. Nil: each is told to
	// Grant.
	Pins func(pins []reader.Grant, current func(i int) bool) error
	// Grants, if set, calls fn with each grant the store holds
	// (reader.Grants). After a reconnect, those whose callers were not
	// reviewed again meanwhile are, with the credentials outpost holds
	// for them, and taken back when the apiserver says no: as the
	// recorder's re-list deletes a view its identity may no longer read.
	Grants func(fn func(identity string, asked store.ViewKey) error) error
	// Online reports whether the cloud is reachable, and Changed returns a
	// channel closed at the next change. Nil: always online.
	Online  func() bool
	Changed func() <-chan struct{}
	// MaxBytes bounds the objects and events all streams hold in memory.
	// A stream that would pass it ends, and its scope goes upstream for a
	// while. Default DefaultMaxBytes.
	MaxBytes int64
	// Recheck is how long the apiserver's answer to a caller's access
	// review holds. Default DefaultRecheck.
	Recheck time.Duration
	// Window is how many events a stream keeps for watches that resume
	// from an older resourceVersion. Default 2048.
	Window int
	// Idle is how long a stream with no client is kept. Default 2m.
	Idle time.Duration
	// BookmarkInterval is how often a caught-up watch that allows them
	// gets a BOOKMARK. Default 10s.
	BookmarkInterval time.Duration
	Metrics          *metrics.Metrics
	Log              *slog.Logger

	ctx     context.Context
	started chan struct{}
	wg      sync.WaitGroup
	bytes   atomic.Int64 // held by all streams

	mu      sync.Mutex // guards the fields below
	streams map[store.ViewKey]*stream
	refused map[store.ViewKey]refusal // scopes left upstream for a while
	reviews map[reviewKey]*review
	answers map[grantKey]map[reviewKey]*review // reviews by user and scope
	pruned  time.Time                          // when reviews were last pruned
	grants  map[grantKey]*grantState           // told to Grant
	// denials counts the grants taken back; denied holds the count at
	// each one's latest, deniedFloor the count when older ones were
	// forgotten (see remember).
	denials, deniedFloor uint64
	denied               map[grantKey]uint64
	stopping             bool

	grantMu     sync.Mutex  // orders the calls of Grant
	pinsFailing atomic.Bool // the last write of pins failed
	initOnce    sync.Once
}

func (c *Cache) init() {
	c.initOnce.Do(func() {
		if c.MaxBytes <= 0 {
			c.MaxBytes = DefaultMaxBytes
		}
		if c.Recheck <= 0 {
			c.Recheck = DefaultRecheck
		}
		if c.Window <= 0 {
			c.Window = defaultWindow
		}
		if c.Idle <= 0 {
			c.Idle = defaultIdle
		}
		if c.BookmarkInterval <= 0 {
			c.BookmarkInterval = defaultBookmark
		}
		c.started = make(chan struct{})
		c.streams = map[store.ViewKey]*stream{}
		c.refused = map[store.ViewKey]refusal{}
		c.reviews = map[reviewKey]*review{}
		c.grants = map[grantKey]*grantState{}
		c.answers = map[grantKey]map[reviewKey]*review{}
		c.denied = map[grantKey]uint64{}
		if c.Metrics != nil {
			c.Metrics.WatchCacheBudget.Set(float64(c.MaxBytes))
		}
	})
}

// Run owns the streams: they run until ctx is done, and Run returns once
// they all ended.
func (c *Cache) Run(ctx context.Context) error {
	c.init()
	c.mu.Lock()
	c.ctx = ctx
	c.mu.Unlock()
	close(c.started)
	c.keepPins(ctx)
	c.mu.Lock()
	c.stopping = true // no stream starts once Run waits for them
	c.mu.Unlock()
	c.wg.Wait()
	return nil
}

func (c *Cache) online() bool { return c.Online == nil || c.Online() }

// Serve answers r from a shared stream when it may, and reports whether
// it did; when it did not, nothing was written and the caller sends r
// upstream.
func (c *Cache) Serve(w http.ResponseWriter, r *http.Request, info *request.Info) bool {
	c.init()
	if !c.running() || !c.online() || !shareable(info) {
		return false
	}
	r = r.WithContext(context.WithValue(r.Context(), arrivalKey{}, time.Now()))
	ctx := r.Context()
	st, filter := c.streamFor(ctx, info)
	if st == nil {
		return false
	}
	if !st.waitSynced(ctx, waitSynced) {
		return false
	}
	if c.Recorded != nil && st.owner != info.Identity.Key() && c.Recorded(info.Identity.Key()) && !c.Recorded(st.owner) {
		st.release()
		return false
	}
	// Counted before it is admitted: a denial after its yes keeps it
	// from writing a grant.
	since := c.denialMark()
	if v := c.admit(ctx, info, st, filter, c.Recheck); v != allowed {
		st.release()
		if v == denied {
			c.forget(info)
		}
		return false
	}
	p := c.remember(info, st, since)
	if info.Watch {
		defer p.end()
		return c.serveWatch(w, r, info, st, filter, p)
	}
	return c.serveList(w, r, info, st, filter, p)
}

// startedChan is closed once Run has started.
func (c *Cache) startedChan() <-chan struct{} {
	c.init()
	return c.started
}

// admit is admitted, except for the stream's owner reading exactly the
// stream's scope with the very credential the stream last used: the
// stream itself is authorized by the apiserver, with it, each time it is
// renewed (at least every Recheck), and ends when refused, so no review
// is needed to know it.
func (c *Cache) admit(ctx context.Context, info *request.Info, st *stream, f filter, maxAge time.Duration) verdict {
	if !f.on && st.owner == info.Identity.Key() && scopeOf(info) == st.scope && st.acceptedAs(credentialOf(info.Identity)) {
		return allowed
	}
	return c.admitted(ctx, info, maxAge)
}

// NodeCredential is Credential's name of the node's client certificate.
const NodeCredential = "cert"

// credentialOf names the credential id presented, as Credential does.
func credentialOf(id request.Identity) string {
	switch id.Kind {
	case request.NodeCert:
		return NodeCredential
	case request.BearerToken:
		return id.TokenHash
	}
	return ""
}

func (c *Cache) running() bool { return isClosed(c.started) }

// shareable reports whether info is a request the apiserver answers from
// its watch cache, in a form shared streams can answer.
func shareable(info *request.Info) bool {
	if info.Identity.Kind != request.NodeCert && info.Identity.Kind != request.BearerToken || info.Impersonating {
		return false
	}
	if info.Subresource != "" || info.Labels == nil || info.Fields == nil {
		return false
	}
	if info.Name != "" {
		// A list or watch by field selector metadata.name (the apiserver's
		// request info names the object), as kubelet watches its pods'
		// ConfigMaps; never a watch of a path naming one object, whose
		// scope would be the whole collection.
		if name, ok := info.Fields.RequiresExactMatch("metadata.name"); !ok || name != info.Name {
			return false
		}
	}
	if strings.Contains(info.Path, "/watch/") {
		return false // the legacy watch path
	}
	if info.Accept.As != "" || (info.Accept.Media != codec.MediaJSON && info.Accept.Media != codec.MediaProtobuf) {
		return false
	}
	if strings.HasSuffix(info.View.Resource, "#meta") || info.View.Resource == "" {
		return false
	}
	o := info.Options
	if o.InvalidLimit != "" || o.InvalidTimeout != "" || o.Continue != "" {
		return false
	}
	switch info.Class {
	case request.ListObjects:
		// rv=0 is answered whole whatever the limit, as the apiserver's
		// watch cache does; NotOlderThan a version, without a limit.
		switch {
		case o.ResourceVersion == "0" && (o.ResourceVersionMatch == "" || o.ResourceVersionMatch == "NotOlderThan"):
			return true
		case o.ResourceVersion != "" && o.ResourceVersionMatch == "NotOlderThan" && o.Limit == 0:
			return parseRV(o.ResourceVersion) != 0
		}
		return false
	case request.WatchObjects:
		if o.SendInitialEvents {
			// A WatchList: NotOlderThan, with bookmarks, as the apiserver
			// requires; it says what is wrong with anything else.
			return o.ResourceVersionMatch == "NotOlderThan" && o.AllowWatchBookmarks &&
				(o.ResourceVersion == "" || o.ResourceVersion == "0" || parseRV(o.ResourceVersion) != 0)
		}
		return o.ResourceVersionMatch == "" && (o.ResourceVersion == "" || o.ResourceVersion == "0" || parseRV(o.ResourceVersion) != 0)
	}
	return false
}

// scopeOf is the stream key of what info asks for.
func scopeOf(info *request.Info) store.ViewKey {
	k := info.View
	k.Identity, k.Name = "", ""
	return k
}

// streamFor finds the stream that answers info: its own scope's, else a
// broader running one (filter then says what to keep), else a new one
// owned by the caller, of a broader scope when the caller may list and
// watch it (the selector is then applied here: kube-proxy's Services and
// coredns's share one stream), else of its own. It returns nil when the
// scope goes upstream.
func (c *Cache) streamFor(ctx context.Context, info *request.Info) (st *stream, f filter) {
	scope := scopeOf(info)
	st, f, found := c.find(scope, info)
	if found {
		return st, f
	}
	if c.UpstreamAs(info.Identity.Key()) == nil {
		return nil, filter{}
	}
	if broad, ok := broaden(scope, info); ok && c.mayStream(ctx, info, broad) {
		if f, ok := covers(broad, scope, info); ok {
			if st := c.start(broad, info.Identity.Key()); st != nil {
				return st, f
			}
		}
	}
	// Reviewed before a stream runs as the caller, for both verbs the
	// stream uses: one the apiserver refuses must not start one, again at
	// each request (nor, refused, leave the scope upstream for everyone).
	for _, verb := range []string{"list", "watch"} {
		switch c.admittedVerb(ctx, info, verb, c.Recheck) {
		case allowed:
			continue
		case denied:
			if verb == "list" || info.Watch {
				c.forget(info)
			}
		}
		return nil, filter{}
	}
	return c.start(scope, info.Identity.Key()), filter{}
}

// find returns the running stream of scope, or a broader synced one with
// what to filter; found is also true, with no stream, when scope goes
// upstream for now.
func (c *Cache) find(scope store.ViewKey, info *request.Info) (st *stream, f filter, found bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if r, ok := c.refused[scope]; ok && time.Now().Before(r.until) {
		return nil, filter{}, true
	}
	if st := c.streams[scope]; st != nil && st.usable() {
		st.use()
		return st, filter{}, true
	}
	for k, st := range c.streams {
		if f, ok := covers(k, scope, info); ok && st.usable() && st.isSynced() {
			st.use()
			return st, f, true
		}
	}
	return nil, filter{}, false
}

// start returns the stream of scope, started with owner's credentials if
// none runs, or nil when scope goes upstream for now.
func (c *Cache) start(scope store.ViewKey, owner string) *stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	if r, ok := c.refused[scope]; ok && time.Now().Before(r.until) {
		return nil
	}
	if st := c.streams[scope]; st != nil && st.usable() {
		st.use()
		return st
	}
	if c.ctx == nil || c.stopping {
		return nil
	}
	st := newStream(c, scope, owner)
	c.streams[scope] = st
	st.use()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		st.run(c.ctx)
	}()
	if c.Metrics != nil {
		c.Metrics.WatchCacheStreams.Set(float64(len(c.streams)))
	}
	return st
}

// broaden drops from scope the selectors outpost can apply itself: labels,
// and fields on name and namespace.
func broaden(scope store.ViewKey, info *request.Info) (store.ViewKey, bool) {
	b := scope
	b.LabelSelector = ""
	if b.FieldSelector != "" {
		for _, r := range info.Fields.Requirements() {
			if r.Field != "metadata.name" && r.Field != "metadata.namespace" {
				return b, b != scope
			}
		}
		b.FieldSelector = ""
	}
	return b, b != scope
}

// mayStream reports whether info's caller may list and watch scope.
func (c *Cache) mayStream(ctx context.Context, info *request.Info, scope store.ViewKey) bool {
	wide := *info
	wide.LabelSelector, wide.FieldSelector = scope.LabelSelector, scope.FieldSelector
	// Its selectors as parsed: the review names the object of a
	// metadata.name field the broad scope kept, as a request of that
	// scope would, since both answers are kept under the same key.
	wide.Labels, wide.Fields = labels.Everything(), fields.Everything()
	if scope.LabelSelector != "" {
		if l, err := labels.Parse(scope.LabelSelector); err == nil {
			wide.Labels = l
		}
	}
	if scope.FieldSelector != "" {
		if f, err := fields.ParseSelector(scope.FieldSelector); err == nil {
			wide.Fields = f
		}
	}
	wide.View.LabelSelector, wide.View.FieldSelector = scope.LabelSelector, scope.FieldSelector
	return c.admittedVerb(ctx, &wide, "list", c.Recheck) == allowed && c.admittedVerb(ctx, &wide, "watch", c.Recheck) == allowed
}

// KeepsFresh reports whether a running stream records view k (its scope,
// as its owner): such a view need not be re-listed after an outage, since
// the stream resumes or lists on its own.
func (c *Cache) KeepsFresh(k store.ViewKey) bool {
	c.init()
	scope := k
	scope.Identity = ""
	c.mu.Lock()
	st := c.streams[scope]
	c.mu.Unlock()
	return st != nil && st.owner == k.Identity && st.usable() && st.isSynced()
}

// ended removes st, which stopped; refuse keeps its scope upstream.
func (c *Cache) ended(st *stream, refuse bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.streams[st.scope] == st {
		delete(c.streams, st.scope)
	}
	if refuse {
		// Longer each time, up to an hour: a scope over the budget would
		// otherwise be fetched whole again and again.
		r := c.refused[st.scope]
		r.n++
		r.until = time.Now().Add(min(refusedFor<<(r.n-1), time.Hour))
		c.refused[st.scope] = r
	} else if st.isSynced() {
		delete(c.refused, st.scope)
	}
	if c.Metrics != nil {
		c.Metrics.WatchCacheStreams.Set(float64(len(c.streams)))
	}
}

// grow accounts n more bytes (negative: fewer) held by streams, and
// reports whether they fit the budget.
// Streams call it with their own lock held, so it takes no lock.
func (c *Cache) grow(n int64) bool {
	now := c.bytes.Add(n)
	if c.Metrics != nil {
		c.Metrics.WatchCacheBytes.Set(float64(now))
	}
	return now <= c.MaxBytes
}

// reserve accounts n more bytes of a fetch in progress (a list's body, a
// WatchList's initial events) and reports whether they fit the budget
// less its last eighth, which is left to the streams already running: a
// large new scope is refused itself rather than make kubelet's or
// kube-proxy's streams, whose next events would not fit, end.
func (c *Cache) reserve(n int64) bool {
	now := c.bytes.Add(n)
	if c.Metrics != nil {
		c.Metrics.WatchCacheBytes.Set(float64(now))
	}
	return now <= c.MaxBytes-c.MaxBytes/8
}

// covers reports whether a stream of scope k holds everything want asks
// for, and what to filter out of it. Selectors are narrowed here only as
// the apiserver would evaluate them: labels always, fields only by name
// and namespace, which every object carries.
func covers(k, want store.ViewKey, info *request.Info) (filter, bool) {
	if k.Resource != want.Resource || k == want {
		return filter{}, false
	}
	f := filter{on: true, labels: info.Labels, fields: info.Fields}
	// A selector the stream shares was applied by the apiserver: not
	// again here, where fields of custom resources are not known.
	if k.LabelSelector == want.LabelSelector {
		f.labels = labels.Everything()
	}
	if k.FieldSelector == want.FieldSelector {
		f.fields = fields.Everything()
	}
	switch {
	case k.Namespace == want.Namespace:
	case k.Namespace == "":
		f.namespace = want.Namespace
	default:
		return filter{}, false
	}
	if k.LabelSelector != "" && k.LabelSelector != want.LabelSelector {
		return filter{}, false
	}
	if k.FieldSelector != "" && k.FieldSelector != want.FieldSelector {
		return filter{}, false
	}
	if k.FieldSelector == "" && want.FieldSelector != "" {
		for _, r := range info.Fields.Requirements() {
			if r.Field != "metadata.name" && r.Field != "metadata.namespace" {
				return filter{}, false
			}
		}
	}
	return f, true
}

// refusal is a scope left upstream until a time, for the n-th time in a row.
type refusal struct {
	until time.Time
	n     int
}
