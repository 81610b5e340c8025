package share

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sync/semaphore"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/reader"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// ServedBy is the X-Outpost-Served-By value of answers from shared streams.
const ServedBy = "watch-cache"

// assembling bounds the bytes of list answers assembled at once: fifty
// clients listing a large scope together must not hold fifty copies.
var assembling = semaphore.NewWeighted(assembleBudget)

const assembleBudget = 32 << 20

// writeTimeout is how long a client may take to read a list answer, a
// watch's batch of initial events, or its next events, before it is let
// go. A variable for tests.
var writeTimeout = 30 * time.Second

// initialBatch is how many initial events of a watch are written within
// one writeTimeout.
const initialBatch = 64

// serveList answers a LIST at resourceVersion 0 (whole, whatever the
// limit, as the apiserver's watch cache does) or NotOlderThan a version,
// once the stream reached it; once written, p is pinned at its version.
func (c *Cache) serveList(w http.ResponseWriter, r *http.Request, info *request.Info, st *stream, f filter, p *pin) bool {
	defer st.release()
	ctx := r.Context()
	o := info.Options
	if o.ResourceVersion != "0" && !st.waitRV(ctx, parseRV(o.ResourceVersion), waitFresh) {
		return false // newer than the node has seen: the apiserver answers
	}
	a := info.Accept
	if !f.on {
		// Many clients listing the scope at once get the same bytes, in
		// the media type they prefer.
		if e, ok := st.encoded(a.Media, parseRV(o.ResourceVersion)); ok {
			if writeList(w, e.contentType, e.body) {
				p.served(e.rv)
			}
			c.served("list")
			return true
		}
	}
	snap := st.snapshot(f)
	if snap.kind == "" || snap.done {
		return false // the stream ended: what it held is gone
	}
	body, contentType, ok := assemble(ctx, snap, a)
	if !ok {
		return false
	}
	if !f.on {
		// Kept as what it is: a JSON answer to a client that prefers
		// protobuf is no answer to one that takes only protobuf.
		st.keepEncoded(contentType, encodedList{gen: snap.gen, rv: snap.rv, contentType: contentType, body: body})
	}
	if writeList(w, contentType, body) {
		p.served(snap.rv)
	}
	c.served("list")
	return true
}

// assemble encodes snap as a list answer in the media type a prefers (or
// JSON, when it also takes that and protobuf fails), holding its bytes
// of the assembling budget only while it encodes: a client that then
// reads slowly holds nobody else's turn. ok is false when it cannot be
// answered here, or ctx ended while it waited for its turn.
func assemble(ctx context.Context, snap snapshot, a codec.Accept) (body []byte, contentType string, ok bool) {
	var size int64
	items := make([][]byte, len(snap.objs))
	protos := make([][]byte, len(snap.objs))
	for i, o := range snap.objs {
		items[i], protos[i] = o.Data, o.Proto
		size += int64(len(o.Data))
	}
	weight := min(size, assembleBudget)
	if err := assembling.Acquire(ctx, weight); err != nil {
		return nil, "", false
	}
	defer assembling.Release(weight)
	rvs := strconv.FormatUint(snap.rv, 10)
	if a.Media == codec.MediaProtobuf {
		if b, ok := codec.ProtobufList(snap.kind+"List", snap.apiVersion, rvs, "", items, protos); ok {
			return b, codec.MediaProtobuf, true
		}
		if !a.PlainJSON {
			return nil, "", false
		}
	}
	for _, item := range items {
		if codec.IsProtobufOnly(item) {
			return nil, "", false
		}
	}
	return codec.JSONList(snap.kind+"List", snap.apiVersion, rvs, "", items), codec.MediaJSON, true
}

// writeList writes a whole list answer, within writeTimeout, and reports
// whether it was.
func writeList(w http.ResponseWriter, contentType string, body []byte) bool {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set(reader.ServedByHeader, ServedBy)
	rc := http.NewResponseController(w)
	_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	w.WriteHeader(http.StatusOK)
	_, err := w.Write(body)
	if err == nil {
		err = rc.Flush()
	}
	// Not left on the connection for its next request.
	_ = rc.SetWriteDeadline(time.Time{})
	return err == nil
}

// serveWatch answers a watch: from a resourceVersion the stream still
// covers (else an ERROR event with 410 Gone, as the apiserver sends), or
// from the stream's objects as ADDED events first (resourceVersion "" or
// "0", and WatchList, which ends them with the initial-events-end
// bookmark). It follows the stream until the client's timeout, the
// client leaves, the stream ends (the client then watches again from its
// resourceVersion), or a new access review says no. p is pinned at the
// version everything up to which was written.
func (c *Cache) serveWatch(w http.ResponseWriter, r *http.Request, info *request.Info, st *stream, f filter, p *pin) bool {
	defer st.release()
	ctx := r.Context()
	o := info.Options
	initial := o.SendInitialEvents || o.ResourceVersion == "" || o.ResourceVersion == "0"
	from := parseRV(o.ResourceVersion)
	if from != 0 && !st.waitRV(ctx, from, waitFresh) {
		return false
	}
	if o.SendInitialEvents && o.ResourceVersion == "" && !st.consistentAfter(arrival(ctx)) && !c.fresh(ctx, r, info, st) {
		return false
	}
	st.mu.Lock()
	kind, apiVersion := st.kind, st.apiVersion
	st.mu.Unlock()
	if kind == "" {
		return false
	}
	enc, err := codec.NewEventEncoder(w, info.Accept, kind, apiVersion, false)
	if err != nil {
		return false
	}
	var next uint64
	var objs []store.Object
	var rv uint64
	tooOld := false
	if initial {
		snap := st.snapshot(f)
		if snap.done {
			return false
		}
		objs, rv, next = snap.objs, snap.rv, snap.next
	} else {
		next, tooOld = st.since(from)
		tooOld = !tooOld
	}
	timeout := 30*time.Minute + time.Duration(rand.Int64N(int64(30*time.Minute))) // the apiserver's default
	if o.TimeoutSeconds > 0 {
		timeout = time.Duration(o.TimeoutSeconds) * time.Second
	}

	w.Header().Set("Content-Type", enc.ContentType)
	w.Header().Set(reader.ServedByHeader, ServedBy)
	rc := http.NewResponseController(w)
	// A client that takes no batch of its initial events within
	// writeTimeout is let go, as later: it would hold a snapshot of the
	// scope and keep the stream from idling.
	_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	w.WriteHeader(http.StatusOK)
	_ = rc.Flush()
	c.served("watch")
	if c.Metrics != nil {
		c.Metrics.WatchCacheWatchers.Inc()
		defer c.Metrics.WatchCacheWatchers.Dec()
	}
	if tooOld {
		st.mu.Lock()
		oldest := st.oldest
		st.mu.Unlock()
		s := expired(o.ResourceVersion, oldest).Status()
		_ = enc.Status(&s)
		_ = rc.Flush()
		_ = rc.SetWriteDeadline(time.Time{})
		if c.Metrics != nil {
			c.Metrics.WatchCacheExpired.Inc()
		}
		return true
	}
	for i, o := range objs {
		if i > 0 && i%initialBatch == 0 {
			_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
		}
		if err := enc.Object(watch.Added, o.Data, o.Proto); err != nil {
			return true
		}
	}
	if o.SendInitialEvents {
		_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
		if err := enc.Bookmark(strconv.FormatUint(rv, 10), true); err != nil {
			return true
		}
	}
	if rc.Flush() != nil {
		return true
	}
	_ = rc.SetWriteDeadline(time.Time{})
	// The client has the scope at rv now, or (resuming) says it had it at
	// from.
	p.served(max(rv, from))

	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(c.BookmarkInterval)
	defer tick.Stop()
	recheck := time.NewTimer(recheckPeriod(c.Recheck))
	defer recheck.Stop()
	allowedAt := time.Now() // the last yes, at most Recheck old
	var bookmarked uint64
	for {
		evs, after, at, notify, done, ok := st.events(next)
		if !ok {
			// Too slow to follow: the events it needed are gone. The
			// apiserver ends such a watch too; the client resumes.
			return true
		}
		if len(evs) > 0 && time.Since(allowedAt) > c.Recheck {
			// Its rechecks were skipped (offline): asked before it gets
			// what came since, which a caller revoked meanwhile must not.
			// No answer ends it too; the client watches again, asked.
			switch v := c.admit(ctx, info, st, f, c.Recheck/2); v {
			case allowed:
				allowedAt = time.Now()
			case denied:
				c.forget(info)
				return true
			default:
				return true
			}
		}
		var left uint64
		sent := false
		if len(evs) > 0 {
			// A client that stops reading is let go rather than holding
			// its events and its stream.
			_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
		}
		for _, e := range evs {
			if e.typ == watch.Bookmark {
				// After a re-list's differences: the version they bring
				// the client to (their objects carry older ones).
				if o.AllowWatchBookmarks {
					if err := enc.Bookmark(strconv.FormatUint(e.rv, 10), false); err != nil {
						return true
					}
					bookmarked, sent = e.rv, true
				}
				continue
			}
			typ, obj, keep := f.event(e)
			if !keep {
				continue
			}
			if err := enc.Object(typ, obj.Data, obj.Proto); err != nil {
				return true
			}
			sent = true
			if typ == watch.Deleted && e.typ == watch.Modified {
				left = max(left, e.rv) // sent at its previous version
			}
		}
		if left > bookmarked && o.AllowWatchBookmarks {
			// The version a leaving object's DELETED did not bring the
			// client to.
			if err := enc.Bookmark(strconv.FormatUint(left, 10), false); err != nil {
				return true
			}
			bookmarked = left
		}
		next = after
		if sent {
			if rc.Flush() != nil {
				return true
			}
		}
		if len(evs) > 0 {
			_ = rc.SetWriteDeadline(time.Time{})
		}
		// Every change up to at was in evs: the client has them all.
		p.served(at)
		if done {
			return true
		}
		select {
		case <-notify:
		case <-tick.C:
			if o.AllowWatchBookmarks && at > bookmarked {
				_ = rc.SetWriteDeadline(time.Now().Add(writeTimeout))
				if err := enc.Bookmark(strconv.FormatUint(at, 10), false); err != nil || rc.Flush() != nil {
					return true
				}
				_ = rc.SetWriteDeadline(time.Time{})
				bookmarked = at
			}
		case <-recheck.C:
			// Asked again at least every Recheck (at most half of it
			// apart, answers kept half of it), so a revoke ends the watch
			// within Recheck. Offline, or when no answer comes, the watch goes on
			// on the last one.
			v := c.recheck(ctx, info, st, f)
			if v == denied || v == rejected {
				if v == denied {
					c.forget(info)
				}
				c.Log.Info("watch cache: access revoked; ending the watch", "identity", info.Identity.Key(), "scope", describe(scopeOf(info)))
				return true
			}
			if v == allowed {
				allowedAt = time.Now()
			}
			recheck.Reset(recheckPeriod(c.Recheck))
		case <-deadline.C:
			return true
		case <-ctx.Done():
			return true
		}
	}
}

// arrivalKey keys the time a request reached Serve in its context.
type arrivalKey struct{}

// arrival is when the request of ctx reached Serve (zero: unknown).
func arrival(ctx context.Context) time.Time {
	t, _ := ctx.Value(arrivalKey{}).(time.Time)
	return t
}

// fresh reports whether st has reached what the apiserver holds now,
// for a consistent WatchList (resourceVersion ""): as kube-apiserver
// waits for its watch cache to reach etcd's current revision, st gets
// waitFresh to reach the resourceVersion of a consistent LIST of the
// caller's scope (limit 1, metadata only, with the caller's credentials,
// so that it costs the apiserver little), with catchUp's help. When that
// read fails, or st does not reach it, the WatchList is left to the
// apiserver.
func (c *Cache) fresh(ctx context.Context, r *http.Request, info *request.Info, st *stream) bool {
	rv, err := c.currentRV(ctx, r, info)
	if err != nil {
		c.Log.Debug("watch cache: no current resourceVersion for a consistent WatchList; upstream", "identity", info.Identity.Key(), "scope", describe(scopeOf(info)), "err", err)
		return false
	}
	return st.catchUp(ctx, rv, waitFresh)
}

// currentRV asks the apiserver, as info's caller, for the resourceVersion
// of a consistent read of info's scope.
func (c *Cache) currentRV(ctx context.Context, r *http.Request, info *request.Info) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, reviewTimeout)
	defer cancel()
	q := url.Values{"limit": {"1"}}
	if info.LabelSelector != "" {
		q.Set("labelSelector", info.LabelSelector)
	}
	if info.FieldSelector != "" {
		q.Set("fieldSelector", info.FieldSelector)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://upstream"+r.URL.EscapedPath()+"?"+q.Encode(), nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Accept", "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json")
	resp, err := c.As(info.Identity).RoundTrip(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if c.Metrics != nil {
		c.Metrics.WatchCacheUpstream.WithLabelValues("current", strconv.Itoa(resp.StatusCode)).Inc()
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, errors.New(statusMessage(resp.Status, body))
	}
	rvs, _, ok := codec.PeekMeta(resp.Header.Get("Content-Type"), body, true)
	if rv := parseRV(rvs); ok && rv != 0 {
		return rv, nil
	}
	return 0, errors.New("a consistent list without a resourceVersion")
}

func (c *Cache) served(verb string) {
	if c.Metrics != nil {
		c.Metrics.WatchCacheServed.WithLabelValues(verb).Inc()
	}
}

// event is what a watch filtered by f sees of e: an object entering the
// selection is ADDED, one leaving it DELETED (with its previous state, as
// the apiserver sends it), others as they are.
func (f filter) event(e event) (watch.EventType, store.Object, bool) {
	if !f.on {
		return e.typ, e.obj, true
	}
	cur := f.keep(e.obj)
	prev := e.prev != nil && f.keep(*e.prev)
	switch e.typ {
	case watch.Added:
		return watch.Added, e.obj, cur
	case watch.Modified:
		switch {
		case cur && prev:
			return watch.Modified, e.obj, true
		case cur:
			return watch.Added, e.obj, true
		case prev:
			// As kube-apiserver's watch cache: the object as the watch
			// last saw it (its new content may be what the caller may not
			// read); the watch then gets a BOOKMARK at the new version.
			return watch.Deleted, *e.prev, true
		}
		return "", store.Object{}, false
	case watch.Deleted:
		return watch.Deleted, e.obj, cur || prev
	}
	return "", store.Object{}, false
}

// describe names a scope in logs.
func describe(k store.ViewKey) string {
	return strings.TrimSpace(k.String())
}

// recheckPeriod is how long a watch being served waits before its caller
// is asked again: 40–50% of recheck, so that watches begun together (a
// fleet started, or back from an outage, at once) are not all asked again
// in the same second, and at least a millisecond (config asks 1 s).
func recheckPeriod(recheck time.Duration) time.Duration {
	d := recheck / 2
	return max(d-time.Duration(rand.Int64N(int64(d/5)+1)), time.Millisecond)
}

// recheck asks again whether a watch being served may go on; offline it
// is not asked (unknown: the watch goes on).
func (c *Cache) recheck(ctx context.Context, info *request.Info, st *stream, f filter) verdict {
	if !c.online() {
		return unknown
	}
	return c.admit(ctx, info, st, f, c.Recheck/2)
}
