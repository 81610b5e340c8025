package share

import (
	"cmp"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// event is one change a stream saw, in order.
type event struct {
	typ watch.EventType
	obj store.Object
	// prev is the object before a MODIFIED or DELETED, so that a watch
	// filtered here sees an object leave or enter its selection.
	prev *store.Object
	rv   uint64
	size int64
	at   time.Time // when it came
}

// stream is one upstream list+watch and what it holds: the scope's
// objects now, and its latest events.
type stream struct {
	c     *Cache
	scope store.ViewKey
	owner string // the identity key whose credentials it uses
	path  string // the scope's collection URL, with its selectors

	syncedCh chan struct{} // closed at the first whole list
	endedCh  chan struct{} // closed when run returns

	mu         sync.Mutex // guards the fields below
	kind       string     // of the objects, e.g. "Pod"
	apiVersion string
	objs       map[string]store.Object // by store.MemberKey
	rv         uint64                  // the latest resourceVersion seen
	ring       []event                 // the latest events, oldest first
	first      uint64                  // sequence number of ring[0]
	oldest     uint64                  // every change after it is in ring
	// bytes counts what s holds against the budget: objects, events
	// (each counted whole, though an object and its latest event share
	// their bytes: a conservative count) and encoded lists.
	bytes, objBytes, ringBytes, listBytes int64
	notify                                chan struct{} // closed and replaced at every change
	done                                  bool          // the stream ended; watches end
	users                                 int           // requests being served from it
	lastUsed                              time.Time
	syncedAt                              time.Time // of the first whole list
	accepted                              string    // the credential of the last request the apiserver answered (Cache.Credential)
	consistentSent                        time.Time // when the first fetch, a consistent WatchList, was sent
	relists                               int       // lists after the first (upstream window passed)
	noWatchList                           bool      // the apiserver refused a WatchList: LIST, then WATCH
	// gen counts changes of objs; keys is objs' keys in the apiserver's
	// order while keysValid (until one is added or removed), and lists the
	// last whole answers encoded, by media type, which clients asking at
	// once share.
	gen       uint64
	keys      []string
	keysValid bool
	lists     map[string]encodedList
}

// encodedList is a whole answer of the stream, as sent.
type encodedList struct {
	gen, rv     uint64
	contentType string
	body        []byte
}

// maxEncodedList bounds an answer kept for the next client.
const maxEncodedList = 16 << 20

func newStream(c *Cache, scope store.ViewKey, owner string) *stream {
	path, _ := request.ViewURL(scope)
	return &stream{c: c, scope: scope, owner: owner, path: path, syncedCh: make(chan struct{}), endedCh: make(chan struct{}),
		objs: map[string]store.Object{}, notify: make(chan struct{}), lastUsed: time.Now()}
}

func (s *stream) usable() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.done
}

func (s *stream) isSynced() bool { return isClosed(s.syncedCh) }

// consistentAfter reports whether s's first fetch was a consistent read
// sent after t, once s is synced: a consistent WatchList that arrived at t
// (as every client's first, at a node's start) then needs no read of the
// apiserver's current version, since s holds at least that already.
func (s *stream) consistentAfter(t time.Time) bool {
	if t.IsZero() || !s.isSynced() {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.consistentSent.IsZero() && !s.consistentSent.Before(t)
}

// version is the resourceVersion s is at.
func (s *stream) version() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rv
}

// acceptedAs reports whether cred is the credential the apiserver last
// accepted for s's requests.
func (s *stream) acceptedAs(cred string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return cred != "" && s.accepted == cred
}

// use notes a request served from s; release its end.
func (s *stream) use() {
	s.mu.Lock()
	s.users++
	s.lastUsed = time.Now()
	s.mu.Unlock()
}

func (s *stream) release() {
	s.mu.Lock()
	s.users--
	s.lastUsed = time.Now()
	s.mu.Unlock()
}

func (s *stream) idle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.users <= 0 && time.Since(s.lastUsed) > s.c.Idle
}

// waitSynced waits for s's first list, at most d; false means it did not
// come (or s ended), and the request was released from s.
func (s *stream) waitSynced(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.syncedCh:
		return true
	case <-s.endedCh:
	case <-ctx.Done():
	case <-t.C:
	}
	s.release()
	return false
}

// waitRV waits until s has seen resourceVersion rv, at most d.
func (s *stream) waitRV(ctx context.Context, rv uint64, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		s.mu.Lock()
		have, notify, done := s.rv, s.notify, s.done
		s.mu.Unlock()
		if have >= rv {
			return true
		}
		if done {
			return false
		}
		select {
		case <-notify:
		case <-ctx.Done():
			return false
		case <-t.C:
			return false
		}
	}
}

// changed wakes the watches; s.mu is held.
func (s *stream) changed() {
	close(s.notify)
	s.notify = make(chan struct{})
}

// Why a stream stopped.
var (
	errExpired = errors.New("resourceVersion expired upstream")
	errRefused = errors.New("refused upstream")
	errTooBig  = errors.New("over the watch cache's memory budget")
	// errNoCredentials: outpost holds no credentials of the owner any more.
	errNoCredentials = fmt.Errorf("%w: no credentials of the owner any more", errRefused)
	errIdle          = errors.New("idle")
	// errNoWatchList: the apiserver does not serve WatchList; the stream
	// lists and watches instead, at once.
	errNoWatchList = errors.New("the apiserver refused a WatchList")
)

// maxRefusals is how many refusals in a row a running stream retries
// (with backoff, about 15 s) before it ends.
const maxRefusals = 4

// What kube-apiserver's watch cache keeps of a resource's events: at
// least the last expectEvents of them (its smallest capacity), and while
// it grows, those of the last expectWindow (its eventFreshDuration).
const (
	expectWindow = 75 * time.Second
	expectEvents = 100
)

// relistJitter spreads the lists of streams whose version expired.
const relistJitter = 8 * time.Second

// run lists and watches s's scope until ctx is done, s is idle, or the
// apiserver refuses it. A broken watch resumes from the last
// resourceVersion seen; one the apiserver no longer has is re-listed,
// once, after a jittered pause.
func (s *stream) run(ctx context.Context) {
	log := s.c.Log.With("scope", s.scope.String(), "owner", s.owner)
	var err error
	defer func() {
		s.mu.Lock()
		s.done = true
		freed := s.bytes
		s.bytes, s.objBytes, s.ringBytes, s.listBytes = 0, 0, 0, 0
		s.objs, s.ring, s.lists, s.keys = nil, nil, nil, nil
		s.changed()
		s.mu.Unlock()
		s.c.grow(-freed)
		// The owner's refusal (its credentials gone, 401, 403) is not the
		// scope's: the next caller starts the stream as itself.
		refuse := errors.Is(err, errRefused) && !isAuthError(err) && !errors.Is(err, errNoCredentials) || errors.Is(err, errTooBig)
		s.c.ended(s, refuse)
		close(s.endedCh)
		if refuse {
			log.Warn("watch cache: scope left to the apiserver for a while", "err", err)
		} else if errors.Is(err, errRefused) {
			log.Info("watch cache: the owner's stream was refused; the next caller starts it as itself", "err", err)
		} else {
			log.Debug("watch cache: stream ended", "err", err)
		}
	}()
	list := true // the scope must be fetched whole: first, or after its version expired
	backoff := time.Second
	refusals := 0
	var brokeAt time.Time // when the last watch broke, if it has not resumed since
	for {
		if ctx.Err() != nil {
			err = ctx.Err()
			return
		}
		if s.idle() {
			err = errIdle
			return
		}
		if !list && !brokeAt.IsZero() && !s.resumable(brokeAt, time.Now()) {
			// Away longer than the apiserver likely kept its events:
			// fetch the scope whole rather than first be told 410, at a
			// jittered moment, as a fleet back from an outage would all
			// at once.
			list = true
			if !s.sleep(ctx, time.Duration(rand.Int64N(int64(relistJitter)))) {
				err = ctx.Err()
				return
			}
		}
		var listed bool
		if list && s.noWatchList {
			err = s.list(ctx)
			listed = err == nil
		} else {
			listed, err = s.watch(ctx, list)
		}
		if listed {
			list = false
		}
		if listed || err == nil {
			brokeAt = time.Time{}
		} else if brokeAt.IsZero() && !errors.Is(err, errExpired) {
			brokeAt = time.Now()
		}
		switch {
		case err == nil:
			backoff, refusals = time.Second, 0
			continue
		case errors.Is(err, errNoWatchList):
			log.Info("watch cache: listing and watching instead", "err", err)
			continue
		case errors.Is(err, errRefused) && refusals < maxRefusals && s.isSynced():
			// An apiserver that just started refuses until its authorizer
			// has loaded RBAC: the watches being served wait a little
			// before the stream gives up.
			refusals++
		case errors.Is(err, errRefused), errors.Is(err, errTooBig), errors.Is(err, errIdle):
			return
		case !s.isSynced():
			// The first list failed: the requests waiting for it go
			// upstream now, and the next one starts the stream again.
			return
		case errors.Is(err, errExpired):
			// The apiserver no longer has the version: list again, once,
			// at a jittered moment, so that a fleet back from an outage
			// does not list at once. The watches served meanwhile stay
			// open and get the differences.
			log.Info("watch cache: re-listing", "err", err)
			list = true
			if !s.sleep(ctx, time.Duration(rand.Int64N(int64(relistJitter)))) {
				err = ctx.Err()
				return
			}
			continue
		}
		if s.c.online() {
			log.Info("watch cache: upstream failed; retrying", "err", err, "in", backoff)
		} else {
			log.Debug("watch cache: upstream failed while offline; retrying", "err", err, "in", backoff)
		}
		if !s.sleep(ctx, backoff) {
			err = ctx.Err()
			return
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// resumable guesses whether the apiserver still has the events since
// s.rv, after s's watch broke at brokeAt, so that a watch from s.rv would
// not be answered 410. Within expectWindow it has. Later, it has when
// fewer than expectEvents of the resource changed since; s knows how busy
// the resource was only when its scope is the whole resource, every
// namespace and no selector, from its events before brokeAt; it then
// guesses the absence brought half as many as the apiserver keeps at
// worst. A scope narrower than that, whose list costs little, is fetched
// whole; so is a busy one, whose version a fleet asking first would find
// gone.
func (s *stream) resumable(brokeAt, now time.Time) bool {
	away := now.Sub(brokeAt)
	if away <= expectWindow {
		return true
	}
	if s.scope.Namespace != "" || s.scope.Name != "" || s.scope.LabelSelector != "" || s.scope.FieldSelector != "" {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	since := max(brokeAt.Sub(s.syncedAt), 0)
	seen := min(since, ringAge)
	if s.syncedAt.IsZero() || seen < 10*time.Second {
		return false // too short a look to tell
	}
	n := 0
	for _, e := range s.ring {
		if e.typ != watch.Bookmark && !e.at.Before(brokeAt.Add(-seen)) && !e.at.After(brokeAt) {
			n++
		}
	}
	// One more than seen, so that a quiet look does not say "never".
	expect := float64(n+1) * away.Seconds() / seen.Seconds()
	return expect < expectEvents/2
}

// sleep waits d with jitter, or until the cloud comes back; false when
// ctx ended.
func (s *stream) sleep(ctx context.Context, d time.Duration) bool {
	if d > 0 {
		d = d/2 + time.Duration(rand.Int64N(int64(d)))
	}
	var back <-chan struct{}
	if s.c.Changed != nil && !s.c.online() {
		back = s.c.Changed()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
	case <-back:
		// Back online: resume after a short jitter rather than the whole
		// backoff.
		j := time.NewTimer(time.Duration(rand.Int64N(int64(time.Second))))
		defer j.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-j.C:
		}
	}
	return true
}

// upstream sends a GET of s's scope with query q as the owner, and lets
// the recorder copy the answer.
func (s *stream) upstream(ctx context.Context, q url.Values, accept string) (*http.Response, error) {
	return s.send(ctx, q, accept, true)
}

// send sends a GET of s's scope with query q as the owner; record lets
// the recorder copy the answer.
func (s *stream) send(ctx context.Context, q url.Values, accept string, record bool) (*http.Response, error) {
	var cred string
	if s.c.Credential != nil {
		cred = s.c.Credential(s.owner)
	}
	rt := s.c.UpstreamAs(s.owner)
	if rt == nil {
		return nil, errNoCredentials
	}
	if s.c.Credential != nil && s.c.Credential(s.owner) != cred {
		// The owner's token changed between the two: which one rt sends
		// is not known, so neither is taken as accepted.
		cred = ""
	}
	u := "https://upstream" + s.path
	if strings.Contains(u, "?") {
		u += "&" + q.Encode()
	} else {
		u += "?" + q.Encode()
	}
	r, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errRefused, err)
	}
	r.Header.Set("Accept", accept)
	if q.Get("watch") != "true" {
		r.Header.Set("Accept-Encoding", "gzip")
	}
	resp, err := rt.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	if s.c.Metrics != nil {
		verb := "list"
		switch {
		case !record:
			verb = "catchup"
		case q.Get("sendInitialEvents") == "true":
			verb = "watchlist"
		case q.Get("watch") == "true":
			verb = "watch"
		}
		s.c.Metrics.WatchCacheUpstream.WithLabelValues(verb, strconv.Itoa(resp.StatusCode)).Inc()
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		err := &statusError{code: resp.StatusCode, msg: statusMessage(resp.Status, body)}
		if isAuthError(err) {
			// Refused: while the stream retries, its owner is reviewed
			// like everyone.
			s.mu.Lock()
			s.accepted = ""
			s.mu.Unlock()
		}
		return nil, err
	}
	s.mu.Lock()
	s.accepted = cred
	s.mu.Unlock()
	if record && s.c.Record != nil {
		// The recorder records it as the owner's answer: the one durable
		// record of the scope.
		info, err := request.Parse(r, s.ownerIdentity())
		if err == nil {
			s.c.Record(resp, info)
		}
	}
	return resp, nil
}

// ownerIdentity is what the recorder files the stream's answers under.
func (s *stream) ownerIdentity() request.Identity {
	return request.Identity{Kind: request.BearerToken, User: s.owner}
}

// accept asks for protobuf where outpost knows the kind (as client-go
// does for built-in kinds), else JSON.
func (s *stream) accept() string {
	s.mu.Lock()
	kind, apiVersion := s.kind, s.apiVersion
	s.mu.Unlock()
	if kind == "" {
		group, version, _ := strings.Cut(strings.TrimSuffix(s.scope.Resource, "#meta"), "/")
		version, resource, _ := strings.Cut(version, "/")
		var listKind string
		listKind, apiVersion = codec.GuessListKind(group, version, resource)
		kind = strings.TrimSuffix(listKind, "List")
	}
	if kind != "" && codec.KnownKind(schema.FromAPIVersionAndKind(apiVersion, kind)) {
		return codec.MediaProtobuf + ", application/json"
	}
	return "application/json"
}

// list replaces what s holds with a whole list from the apiserver: from
// its watch cache (resourceVersion 0) the first time, not older than what
// s saw afterwards. After the first, the differences reach the watches
// as events, so local clients need not list again.
func (s *stream) list(ctx context.Context) error {
	q := url.Values{}
	s.mu.Lock()
	have := s.rv
	s.mu.Unlock()
	if have == 0 {
		q.Set("resourceVersion", "0")
	} else {
		q.Set("resourceVersion", strconv.FormatUint(have, 10))
		q.Set("resourceVersionMatch", "NotOlderThan")
	}
	resp, err := s.upstream(ctx, q, s.accept())
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body io.Reader = resp.Body
	if resp.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(resp.Body)
		if err != nil {
			return err
		}
		body = zr
	}
	raw, err := io.ReadAll(io.LimitReader(body, s.c.MaxBytes+1))
	if err != nil {
		return err
	}
	if int64(len(raw)) > s.c.MaxBytes {
		return errTooBig
	}
	// The answer is held while it is decoded: counted too.
	defer s.c.grow(-int64(len(raw)))
	if !s.c.reserve(int64(len(raw))) {
		return errTooBig
	}
	l, err := codec.DecodeList(resp.Header.Get("Content-Type"), raw, s.scope.Resource, s.known)
	if err != nil {
		return fmt.Errorf("%w: %v", errRefused, err)
	}
	rv := parseRV(l.ResourceVersion)
	if rv == 0 {
		return fmt.Errorf("%w: list without a resourceVersion", errRefused)
	}
	return s.replace(l, rv)
}

// known lets the list decoder keep objects s holds unchanged.
func (s *stream) known(ns, name, rv string) (store.Object, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.objs[store.MemberKey(ns, name)]
	return o, ok && o.ResourceVersion == rv
}

// replace makes l, at rv, what s holds. After the first list the
// differences are appended as events, deletions first, then the rest by
// resourceVersion, all at rv in the ring.
func (s *stream) replace(l codec.List, rv uint64) error {
	objs := make(map[string]store.Object, len(l.Items))
	var size int64
	for _, o := range l.Items {
		objs[store.MemberKey(o.Namespace, o.Name)] = o
		size += objectSize(o)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	first := s.rv == 0
	var evs []event
	if !first {
		for k, old := range s.objs {
			if _, ok := objs[k]; !ok {
				evs = append(evs, event{typ: watch.Deleted, obj: old, prev: &old, rv: rv, size: objectSize(old)})
			}
		}
		var changed []event
		for k, o := range objs {
			old, ok := s.objs[k]
			switch {
			case !ok:
				changed = append(changed, event{typ: watch.Added, obj: o, rv: rv, size: objectSize(o)})
			case old.ResourceVersion != o.ResourceVersion:
				changed = append(changed, event{typ: watch.Modified, obj: o, prev: &old, rv: rv, size: objectSize(o)})
			}
		}
		slices.SortFunc(changed, func(a, b event) int {
			return cmp.Compare(parseRV(a.obj.ResourceVersion), parseRV(b.obj.ResourceVersion))
		})
		evs = append(evs, changed...)
		// Then the version they bring a watch to: their objects carry
		// older ones, from which a resumed watch would get them again.
		evs = append(evs, event{typ: watch.Bookmark, rv: rv, size: bookmarkSize})
		s.relists++
	}
	var evSize int64
	for _, e := range evs {
		evSize += e.size
	}
	// The answers encoded before go: they are of the objects replaced.
	if !s.account(size, s.ringBytes+evSize, 0) {
		return errTooBig
	}
	s.lists = nil
	s.objs = objs
	s.gen++
	s.keysValid = false
	kind := strings.TrimSuffix(l.Kind, "List")
	if kind != "" {
		s.kind, s.apiVersion = kind, l.APIVersion
	}
	if first {
		s.oldest = rv
		s.syncedAt = time.Now()
	}
	s.rv = max(s.rv, rv)
	now := time.Now()
	for i := range evs {
		evs[i].at = now
	}
	s.ring = append(s.ring, evs...)
	s.trim()
	s.changed()
	if first {
		close(s.syncedCh)
	}
	return nil
}

// watch follows the scope from s.rv until the watch ends. With initial,
// it is a WatchList: the scope's objects first (not older than s.rv), which
// replace what s holds at the initial-events-end bookmark (listed), in one
// request instead of a LIST and a WATCH.
func (s *stream) watch(ctx context.Context, initial bool) (listed bool, err error) {
	var consistentSent time.Time
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.mu.Lock()
	from := s.rv
	s.mu.Unlock()
	q := url.Values{}
	q.Set("watch", "true")
	q.Set("allowWatchBookmarks", "true")
	if initial {
		q.Set("sendInitialEvents", "true")
		q.Set("resourceVersionMatch", "NotOlderThan")
		if from != 0 {
			q.Set("resourceVersion", strconv.FormatUint(from, 10))
		} else {
			// The first fetch, a consistent read: what s holds once it
			// is done is as fresh as the apiserver was when it was sent.
			consistentSent = time.Now()
		}
	} else {
		q.Set("resourceVersion", strconv.FormatUint(from, 10))
	}
	// Renewed every few minutes, as informers do, so that a link that
	// died silently is found by the renewal at worst; and at least every
	// Recheck, since each renewal is the apiserver authorizing the owner,
	// whose own reads of the scope are not reviewed otherwise.
	renew := min(240+rand.IntN(120), max(int(s.c.Recheck/time.Second), 1))
	q.Set("timeoutSeconds", strconv.Itoa(renew))
	resp, err := s.upstream(ctx, q, s.accept())
	if err != nil {
		if initial && errors.Is(err, errRefused) && !isAuthError(err) {
			// An apiserver without WatchList: LIST, then WATCH.
			s.noWatchList = true
			return false, fmt.Errorf("%w (%v): listing instead", errNoWatchList, err)
		}
		return false, err
	}
	defer resp.Body.Close()
	// An idle stream stops even while its watch is quiet.
	stopIdle := make(chan struct{})
	defer close(stopIdle)
	go func() {
		t := time.NewTicker(max(s.c.Idle/4, time.Second))
		defer t.Stop()
		for {
			select {
			case <-stopIdle:
				return
			case <-t.C:
				if s.idle() {
					cancel()
					return
				}
			}
		}
	}()
	dec, err := codec.NewWatchDecoder(resp.Header.Get("Content-Type"), resp.Body, s.scope.Resource)
	if err != nil {
		return false, fmt.Errorf("%w: %v", errRefused, err)
	}
	var items []store.Object
	var reserved int64 // initial events held, counted against the budget
	defer func() { s.c.grow(-reserved) }()
	for {
		ev, err := dec.Next()
		if err != nil {
			if s.idle() {
				return listed, errIdle
			}
			if err == io.EOF && (listed || !initial) {
				return listed, nil // ended (timeout): watch again from s.rv
			}
			if err == io.EOF {
				err = errors.New("the watch ended before its initial events did")
			}
			return listed, err
		}
		inInitial := initial && !listed
		switch {
		case ev.Type == watch.Error:
			// The apiserver says 410 Gone this way once the watch began;
			// other errors (an apiserver whose cache is still starting)
			// are retried from the same resourceVersion.
			if ev.Code == http.StatusGone {
				return listed, fmt.Errorf("%w: watch from %d", errExpired, from)
			}
			return listed, fmt.Errorf("watch error event, code %d", ev.Code)
		case inInitial && ev.Type == watch.Added:
			items = append(items, ev.Object)
			n := objectSize(ev.Object)
			reserved += n
			if !s.c.reserve(n) {
				return false, errTooBig
			}
		case inInitial && ev.Type == watch.Bookmark && ev.InitialEventsEnd:
			l := codec.List{Kind: ev.Kind + "List", APIVersion: ev.APIVersion, ResourceVersion: ev.Object.ResourceVersion, Items: items}
			rv := parseRV(l.ResourceVersion)
			if rv == 0 {
				return false, fmt.Errorf("%w: initial-events-end bookmark without a resourceVersion", errRefused)
			}
			s.c.grow(-reserved)
			reserved = 0
			if !consistentSent.IsZero() {
				// Before the list closes syncedCh: its waiters read it.
				s.mu.Lock()
				s.consistentSent = consistentSent
				s.mu.Unlock()
			}
			if err := s.replace(l, rv); err != nil {
				return false, err
			}
			items, listed = nil, true
		case inInitial && ev.Type == watch.Bookmark:
		case inInitial:
			// Changes before the initial events ended: not a WatchList.
			s.noWatchList = true
			return false, fmt.Errorf("%w: a %s event among the initial events", errNoWatchList, ev.Type)
		case ev.Type == watch.Bookmark:
			s.progress(parseRV(ev.Object.ResourceVersion))
		default:
			if err := s.apply(ev); err != nil {
				return listed, err
			}
		}
	}
}

// metaAccept asks for objects' metadata only.
const metaAccept = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"

// catchUp brings s to rv, the apiserver's current resourceVersion, or
// reports that it could not within d. A quiet scope's stream hears that
// the cluster moved on only from the apiserver's bookmarks, about once a
// minute; so catchUp asks: a WatchList of s's scope NotOlderThan rv, as
// its owner, metadata only, whose initial events are the scope's objects
// at a version at or after rv. When s holds the same objects at the same
// resourceVersions (now, or once its own watch brought the changes),
// nothing in the scope changed in between, and s is at that version too.
// The answer is not recorded; it costs the apiserver less than the full
// WatchList it saves.
func (s *stream) catchUp(ctx context.Context, rv uint64, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	s.mu.Lock()
	have, done := s.rv, s.done
	s.mu.Unlock()
	if have >= rv || done {
		return !done
	}
	q := url.Values{}
	q.Set("watch", "true")
	q.Set("sendInitialEvents", "true")
	q.Set("resourceVersionMatch", "NotOlderThan")
	q.Set("resourceVersion", strconv.FormatUint(rv, 10))
	q.Set("allowWatchBookmarks", "true")
	resp, err := s.send(ctx, q, metaAccept, false)
	if err != nil {
		return s.waitRV(ctx, rv, d)
	}
	defer resp.Body.Close()
	dec, err := codec.NewWatchDecoder(resp.Header.Get("Content-Type"), resp.Body, s.scope.Resource+"#meta")
	if err != nil {
		return s.waitRV(ctx, rv, d)
	}
	upstream := map[string]string{} // the scope's objects' versions at at
	var at uint64
	for at == 0 {
		ev, err := dec.Next()
		switch {
		case err != nil:
			return s.waitRV(ctx, rv, d)
		case ev.Type == watch.Added:
			upstream[store.MemberKey(ev.Object.Namespace, ev.Object.Name)] = ev.Object.ResourceVersion
		case ev.Type == watch.Bookmark && ev.InitialEventsEnd:
			at = parseRV(ev.Object.ResourceVersion)
			if at < rv {
				return s.waitRV(ctx, rv, d)
			}
		case ev.Type != watch.Bookmark:
			// Not a WatchList (an apiserver without it).
			return s.waitRV(ctx, rv, d)
		}
	}
	resp.Body.Close()
	for {
		s.mu.Lock()
		if s.done {
			s.mu.Unlock()
			return false
		}
		if s.rv >= at || s.holds(upstream) {
			if at > s.rv {
				s.rv = at
				s.changed()
			}
			s.mu.Unlock()
			return true
		}
		notify := s.notify
		s.mu.Unlock()
		select {
		case <-notify:
		case <-ctx.Done():
			return false
		}
	}
}

// holds reports whether s holds exactly the objects of versions, at those
// resourceVersions; s.mu is held.
func (s *stream) holds(versions map[string]string) bool {
	if len(s.objs) != len(versions) {
		return false
	}
	for k, o := range s.objs {
		if versions[k] != o.ResourceVersion {
			return false
		}
	}
	return true
}

// statusError is the apiserver's refusal of a stream's request: 410 is
// errExpired; 400, 401, 403, 404, 406 and 422 are errRefused.
type statusError struct {
	code int
	msg  string
}

func (e *statusError) Error() string { return e.msg }

func (e *statusError) Is(target error) bool {
	switch target {
	case errExpired:
		return e.code == http.StatusGone
	case errRefused:
		switch e.code {
		case http.StatusBadRequest, http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound, http.StatusNotAcceptable, http.StatusUnprocessableEntity:
			return true
		}
	}
	return false
}

// statusMessage is an apiserver's refusal in one readable line: the HTTP
// status and the message of the Status it sent, JSON or protobuf; only the
// HTTP status when the body is no Status (never raw protobuf bytes).
func statusMessage(httpStatus string, body []byte) string {
	obj, err := codec.Decode(body, nil)
	if st, ok := obj.(*metav1.Status); err == nil && ok && st.Message != "" {
		return httpStatus + ": " + strings.Join(strings.Fields(st.Message), " ")
	}
	return httpStatus
}

// isAuthError reports a refusal of the caller (401, 403), not of the
// request's form.
func isAuthError(err error) bool {
	var se *statusError
	return errors.As(err, &se) && (se.code == http.StatusUnauthorized || se.code == http.StatusForbidden)
}

// progress notes that the scope is at rv (a bookmark).
func (s *stream) progress(rv uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rv > s.rv {
		s.rv = rv
		s.changed()
	}
}

// apply adds one upstream event.
func (s *stream) apply(ev codec.Event) error {
	o := ev.Object
	rv := parseRV(o.ResourceVersion)
	key := store.MemberKey(o.Namespace, o.Name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if rv != 0 && rv <= s.rv {
		return nil // seen already (a watch resumed just before it)
	}
	e := event{typ: ev.Type, obj: o, rv: max(rv, s.rv), size: objectSize(o), at: time.Now()}
	old, had := s.objs[key]
	if had {
		e.prev = &old
	}
	if ev.Type == watch.Deleted && !had {
		// Nothing to delete (it was never in the scope s holds), but s
		// has seen rv: a request NotOlderThan it is answered now.
		s.rv = e.rv
		s.changed()
		return nil
	}
	objBytes := s.objBytes
	if had {
		objBytes -= objectSize(old)
	}
	if ev.Type != watch.Deleted {
		objBytes += e.size
	}
	if !s.account(objBytes, s.ringBytes+e.size, s.listBytes) {
		return errTooBig
	}
	if ev.Type == watch.Deleted {
		delete(s.objs, key)
	} else {
		s.objs[key] = o
	}
	s.gen++
	if !had || ev.Type == watch.Deleted {
		s.keysValid = false
	}
	if ev.Kind != "" && s.kind == "" {
		s.kind, s.apiVersion = ev.Kind, ev.APIVersion
	}
	s.rv = e.rv
	s.ring = append(s.ring, e)
	s.trim()
	s.changed()
	return nil
}

// trim drops the oldest events past the window: more than Window of
// them, or older than ringAge; s.mu is held.
func (s *stream) trim() {
	n := max(len(s.ring)-s.c.Window, 0)
	old := time.Now().Add(-ringAge)
	for n < len(s.ring) && s.ring[n].at.Before(old) {
		n++
	}
	if n == 0 {
		return
	}
	var freed int64
	for _, e := range s.ring[:n] {
		freed += e.size
	}
	s.oldest = s.ring[n-1].rv
	s.ring = slices.Clone(s.ring[n:])
	s.first += uint64(n)
	s.account(s.objBytes, s.ringBytes-freed, s.listBytes)
}

// ringAge bounds how long an event is kept: local watches resume within
// seconds (their link is the node's loopback), and a busy scope would
// otherwise keep Window events, and their memory, for as long as it is
// watched. A watch from an older version gets 410 and lists, from the
// stream.
const ringAge = 150 * time.Second

// bookmarkSize is what a bookmark event in the ring is counted.
const bookmarkSize = 64

// account makes s's counted bytes objBytes+ringBytes+listBytes, and
// reports false, changing nothing, when growing would pass the budget;
// s.mu is held.
func (s *stream) account(objBytes, ringBytes, listBytes int64) bool {
	delta := objBytes + ringBytes + listBytes - s.bytes
	if !s.c.grow(delta) && delta > 0 {
		s.c.grow(-delta)
		return false
	}
	s.objBytes, s.ringBytes, s.listBytes, s.bytes = objBytes, ringBytes, listBytes, objBytes+ringBytes+listBytes
	return true
}

// snapshot is what s holds at one moment.
type snapshot struct {
	objs             []store.Object // in the apiserver's order
	rv, next, gen    uint64         // next: the sequence number of the next event
	kind, apiVersion string
	done             bool // the stream ended: it holds nothing any more
}

// snapshot returns the objects s holds that f keeps, in the apiserver's
// order (by "namespace/name"), the resourceVersion they are at and the
// sequence number of the next event. The order is kept between changes.
func (s *stream) snapshot(f filter) snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return snapshot{done: true}
	}
	if !s.keysValid {
		s.keys = slices.Sorted(maps.Keys(s.objs))
		s.keysValid = true
	}
	objs := make([]store.Object, 0, len(s.keys))
	for _, k := range s.keys {
		if o := s.objs[k]; f.keep(o) {
			objs = append(objs, o)
		}
	}
	return snapshot{objs: objs, rv: s.rv, next: s.first + uint64(len(s.ring)), gen: s.gen, kind: s.kind, apiVersion: s.apiVersion}
}

// encoded returns the whole answer of media type key kept at the current
// generation, if its resourceVersion is min or newer.
func (s *stream) encoded(key string, min uint64) (encodedList, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.lists[key]
	return e, ok && e.gen == s.gen && e.rv >= min
}

// keepEncoded keeps e, a whole answer of media type key, for the next
// clients, unless s changed since its snapshot or it is too large.
func (s *stream) keepEncoded(key string, e encodedList) {
	if len(e.body) > maxEncodedList {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done || e.gen != s.gen {
		return
	}
	if s.lists == nil {
		s.lists = map[string]encodedList{}
	}
	if !s.account(s.objBytes, s.ringBytes, s.listBytes+int64(len(e.body)-len(s.lists[key].body))) {
		return
	}
	s.lists[key] = e
}

// since returns the sequence number of the first event after rv, or
// false when s no longer holds every change after rv (410 Gone).
func (s *stream) since(rv uint64) (next uint64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if rv < s.oldest {
		return 0, false
	}
	i, _ := slices.BinarySearchFunc(s.ring, rv, func(e event, rv uint64) int {
		if e.rv <= rv {
			return -1
		}
		return 1
	})
	return s.first + uint64(i), true
}

// events returns the events from sequence number next on, the number to
// ask next, the resourceVersion s is at, a channel closed at the next
// change, and whether s ended. ok is false when the events from next were
// dropped already (a watch too slow to follow).
func (s *stream) events(next uint64) (evs []event, after, rv uint64, notify <-chan struct{}, done, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if next < s.first {
		return nil, next, s.rv, s.notify, s.done, false
	}
	end := s.first + uint64(len(s.ring))
	if next < end {
		evs = slices.Clone(s.ring[next-s.first:])
	}
	return evs, end, s.rv, s.notify, s.done, true
}

func objectSize(o store.Object) int64 {
	return int64(len(o.Data)+len(o.Proto)) + 256
}

func parseRV(s string) uint64 {
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0
	}
	return n
}

// filter is what a request served from a broader stream keeps.
type filter struct {
	on        bool
	namespace string
	labels    labels.Selector
	fields    fields.Selector
}

func (f filter) keep(o store.Object) bool {
	if !f.on {
		return true
	}
	if f.namespace != "" && o.Namespace != f.namespace {
		return false
	}
	if !f.labels.Matches(labels.Set(o.Labels)) {
		return false
	}
	return f.fields.Matches(objectFields{o})
}

// objectFields is an object's field set for selectors, with its name and
// namespace whatever the codec filled in.
type objectFields struct{ o store.Object }

func (f objectFields) Has(field string) bool {
	if field == "metadata.name" || field == "metadata.namespace" {
		return true
	}
	_, ok := f.o.Fields[field]
	return ok
}

func (f objectFields) Get(field string) string {
	switch field {
	case "metadata.name":
		return f.o.Name
	case "metadata.namespace":
		return f.o.Namespace
	}
	return f.o.Fields[field]
}

// expired is the Status a watch gets for a resourceVersion s no longer
// covers, worded as the apiserver's.
func expired(rv string, oldest uint64) *apierrors.StatusError {
	return apierrors.NewResourceExpired(fmt.Sprintf("too old resource version: %s (%d)", rv, oldest))
}
