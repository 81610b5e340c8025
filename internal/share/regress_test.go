package share

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// These tests come from a review of the watch cache: each failed before
// its fix.

// heldBytes is what s really holds, as its count should say.
func heldBytes(s *stream) int64 {
	var n int64
	for _, o := range s.objs {
		n += objectSize(o)
	}
	for _, e := range s.ring {
		n += e.size
	}
	for _, l := range s.lists {
		n += int64(len(l.body))
	}
	return n
}

// TestAccountingAcrossRelist: a list after the first kept counting the
// events and answers it did not drop, and trimming them later took the
// count below zero.
func TestAccountingAcrossRelist(t *testing.T) {
	s := newTestStream(4)
	big := func(name, rv string) codec.Event {
		o := obj("", name, rv, nil)
		o.Data = make([]byte, 10000)
		return codec.Event{Type: watch.Added, Object: o}
	}
	if err := s.replace(list("10", obj("", "a", "3", nil)), 10); err != nil {
		t.Fatal(err)
	}
	for i, rv := range []string{"11", "12", "13", "14"} {
		if err := s.apply(big("o"+string(rune('a'+i)), rv)); err != nil {
			t.Fatal(err)
		}
	}
	snap := s.snapshot(filter{})
	s.keepEncoded("json", encodedList{gen: snap.gen, rv: snap.rv, body: make([]byte, 5000)})
	check := func(when string) {
		t.Helper()
		if got, held := s.c.bytes.Load(), heldBytes(s); got != held || s.bytes != held {
			t.Fatalf("%s: the cache counts %d bytes, the stream %d, it holds %d", when, got, s.bytes, held)
		}
	}
	check("before the re-list")
	if err := s.replace(list("20", obj("", "a", "3", nil)), 20); err != nil {
		t.Fatal(err)
	}
	check("after the re-list")
	for _, rv := range []string{"21", "22", "23", "24"} {
		if err := s.apply(codec.Event{Type: watch.Modified, Object: obj("", "a", rv, nil)}); err != nil {
			t.Fatal(err)
		}
	}
	check("after trimming")
}

// TestEndedStreamAnswersNothing: a request that found a stream just before
// it ended was answered an empty list, which makes an informer delete
// everything it holds.
func TestEndedStreamAnswersNothing(t *testing.T) {
	s := newTestStream(10)
	if err := s.replace(list("10", obj("", "a", "3", nil), obj("", "b", "4", nil)), 10); err != nil {
		t.Fatal(err)
	}
	_ = s.snapshot(filter{})
	s.use()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s.run(ctx) // ends, as on idle, too big or refused
	info := parse(t, "/api/v1/configmaps?resourceVersion=0", node)
	w := httptest.NewRecorder()
	if s.c.serveList(w, httptest.NewRequest("GET", "/api/v1/configmaps?resourceVersion=0", nil), info, s, filter{}, nil) {
		t.Fatalf("an ended stream answered a list: %s", w.Body.String())
	}
	s.use()
	info = parse(t, "/api/v1/configmaps?watch=true", node)
	if s.c.serveWatch(w, httptest.NewRequest("GET", "/api/v1/configmaps?watch=true", nil), info, s, filter{}, nil) {
		t.Fatalf("an ended stream answered a watch: %s", w.Body.String())
	}
}

type unreachable struct{}

func (unreachable) RoundTrip(*http.Request) (*http.Response, error) {
	return nil, errors.New("dial tcp: connect: connection refused")
}

type denying struct{}

func (denying) RoundTrip(*http.Request) (*http.Response, error) {
	body := `{"apiVersion":"authorization.k8s.io/v1","kind":"SelfSubjectAccessReview","status":{"allowed":false}}`
	return &http.Response{StatusCode: http.StatusCreated, Header: http.Header{}, Body: io.NopCloser(strings.NewReader(body))}, nil
}

// grantCalls records what Grant is told.
type grantCalls struct{ calls []string }

func (g *grantCalls) grant(id string, _, _ store.ViewKey, rv uint64, allowed bool) {
	if allowed {
		g.calls = append(g.calls, id+" allowed at "+strconv.FormatUint(rv, 10))
	} else {
		g.calls = append(g.calls, id+" taken back")
	}
}

// TestUnansweredRecheckTakesNothingBack: an access review that got no
// answer (the link is down) was taken as a no: the watch ended and the
// caller's grant was deleted, so it could not be answered offline.
func TestUnansweredRecheckTakesNothingBack(t *testing.T) {
	g := &grantCalls{}
	c := &Cache{As: func(request.Identity) http.RoundTripper { return unreachable{} }, UpstreamAs: func(string) http.RoundTripper { return unreachable{} },
		Grant: g.grant, Recheck: 50 * time.Millisecond, Log: newTestStream(1).c.Log}
	c.init()
	c.ctx = context.Background()
	s := newStream(c, store.ViewKey{Resource: "/v1/configmaps"}, "u")
	if err := s.replace(list("10", obj("", "a", "3", nil)), 10); err != nil {
		t.Fatal(err)
	}
	b := request.Identity{Kind: request.BearerToken, User: "b", Token: "t"}
	info := parse(t, "/api/v1/configmaps?watch=true&resourceVersion=10", b)
	c.grants[grantKey{"b", scopeOf(info)}] = &grantState{source: store.ViewKey{Resource: s.scope.Resource, Identity: "u"}, st: s}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	s.use()
	start := time.Now()
	c.serveWatch(httptest.NewRecorder(), httptest.NewRequest("GET", "/api/v1/configmaps?watch=true&resourceVersion=10", nil).WithContext(ctx), info, s, filter{}, nil)
	if len(g.calls) != 0 || time.Since(start) < 400*time.Millisecond {
		t.Fatalf("unanswered reviews ended the watch after %v and told Grant %v", time.Since(start), g.calls)
	}
}

// TestDenialTakesBackStoredGrant: after a restart, when outpost holds no
// grant in memory, a denial did not delete the one the store kept.
func TestDenialTakesBackStoredGrant(t *testing.T) {
	g := &grantCalls{}
	c := &Cache{As: func(request.Identity) http.RoundTripper { return denying{} }, UpstreamAs: func(string) http.RoundTripper { return denying{} },
		Grant: g.grant, Log: newTestStream(1).c.Log}
	c.init()
	c.ctx = context.Background()
	close(c.started)
	b := request.Identity{Kind: request.BearerToken, User: "b", Token: "t"}
	info := parse(t, "/api/v1/configmaps?resourceVersion=0", b)
	s := newStream(c, scopeOf(info), "u")
	if err := s.replace(list("10", obj("", "a", "3", nil)), 10); err != nil {
		t.Fatal(err)
	}
	c.streams[s.scope] = s
	if c.Serve(httptest.NewRecorder(), httptest.NewRequest("GET", "/api/v1/configmaps?resourceVersion=0", nil), info) {
		t.Fatal("a denied caller was served")
	}
	if len(g.calls) != 1 || g.calls[0] != "b taken back" {
		t.Fatalf("Grant was told %v, want the grant taken back", g.calls)
	}
}

// TestFetchLeavesRoomForRunningStreams: a new scope's fetch took the
// budget up to its end, so the running streams' next events did not fit
// and they ended, their scopes refused, rather than the newcomer.
func TestFetchLeavesRoomForRunningStreams(t *testing.T) {
	running := newTestStream(100)
	running.c.MaxBytes = 100_000
	if err := running.replace(list("10", obj("", "a", "3", nil)), 10); err != nil {
		t.Fatal(err)
	}
	held := running.c.bytes.Load()
	// A fetch that would leave less than an eighth of the budget is refused...
	big := running.c.MaxBytes - running.c.MaxBytes/8 - held + 1
	if running.c.reserve(big) {
		t.Fatalf("a fetch of %d bytes beside %d held fit a budget of %d", big, held, running.c.MaxBytes)
	}
	running.c.grow(-big)
	// ...one that leaves it is not, and the running stream's next event
	// still fits while the fetch holds its bytes.
	if !running.c.reserve(big - 1) {
		t.Fatal("a fetch leaving an eighth of the budget was refused")
	}
	if err := running.apply(codec.Event{Type: watch.Modified, Object: obj("", "a", "11", nil)}); err != nil {
		t.Fatalf("the running stream's event beside the fetch: %v", err)
	}
}
