package share

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outposthq/outpost/internal/reader"
	"github.com/outposthq/outpost/internal/store"
)

// waitUntil polls cond for up to 5 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not %s within 5 s", what)
		}
	}
}

// pending is the pin to write of k's grant, 0 when there is none.
func (c *Cache) pendingOf(k grantKey) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if g := c.grants[k]; g != nil {
		return g.pending
	}
	return 0
}

// TestPinsWrittenAtOnce (review11 #6): moved pins were written one synced
// commit each, with grantMu held throughout, so new grants waited behind
// them; now they are written together, without grantMu, and a grant taken
// back while they are written is not written again.
func TestPinsWrittenAtOnce(t *testing.T) {
	c := &Cache{Log: newTestStream(1).c.Log}
	c.init()
	got := logGrants(c)
	st := newStream(c, store.ViewKey{Resource: "/v1/configmaps"}, "owner")
	source := store.ViewKey{Resource: "/v1/configmaps", Identity: "owner"}
	var keys []grantKey
	for _, id := range []string{"a", "b", "c"} {
		k := grantKey{id, store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns"}}
		keys = append(keys, k)
		c.grants[k] = &grantState{source: source, st: st, rv: 10, pending: 12}
	}
	var calls, written [][]string
	grantMuFree := true
	c.Pins = func(pins []reader.Grant, current func(int) bool) error {
		if !c.grantMu.TryLock() {
			grantMuFree = false
		} else {
			c.grantMu.Unlock()
		}
		var ids, wrote []string
		for _, p := range pins {
			ids = append(ids, p.Identity)
		}
		// b is denied while the pins are being written.
		c.takeBack(keys[1], false)
		for i, p := range pins {
			if current(i) {
				wrote = append(wrote, p.Identity+" "+itoa(p.RV))
			}
		}
		slices.Sort(ids)
		slices.Sort(wrote)
		calls, written = append(calls, ids), append(written, wrote)
		return nil
	}
	done := make(chan struct{})
	go func() { c.writePins(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("writePins held grantMu while a denial, in the middle of its write, waited for it")
	}
	if len(calls) != 1 || !slices.Equal(calls[0], []string{"a", "b", "c"}) {
		t.Errorf("pins written in %d transactions %v, want one of a, b and c", len(calls), calls)
	}
	if !grantMuFree {
		t.Error("grantMu held while the pins were written")
	}
	if len(written) != 1 || !slices.Equal(written[0], []string{"a 12", "c 12"}) {
		t.Errorf("written %v, want a and c at 12 (b taken back meanwhile)", written)
	}
	if want := []string{"delete"}; !slices.Equal(got(), want) {
		t.Errorf("Grant told %v, want %v", got(), want)
	}
	// Written: nothing moves, nothing is written again.
	calls = nil
	c.writePins()
	if len(calls) != 0 {
		t.Errorf("pins written again without moving: %v", calls)
	}
}

// TestFailedPinsWrittenNextTime: a write of pins that fails leaves them to
// write at the next period.
func TestFailedPinsWrittenNextTime(t *testing.T) {
	c := &Cache{Log: newTestStream(1).c.Log}
	c.init()
	logGrants(c)
	st := newStream(c, store.ViewKey{Resource: "/v1/configmaps"}, "owner")
	k := grantKey{"a", store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns"}}
	c.grants[k] = &grantState{source: store.ViewKey{Resource: "/v1/configmaps", Identity: "owner"}, st: st, rv: 10, pending: 12}
	fail := true
	var wrote []uint64
	c.Pins = func(pins []reader.Grant, current func(int) bool) error {
		if fail {
			return errors.New("disk full")
		}
		for _, p := range pins {
			wrote = append(wrote, p.RV)
		}
		return nil
	}
	c.writePins()
	fail = false
	c.writePins()
	if !slices.Equal(wrote, []uint64{12}) {
		t.Errorf("after a failed write, the next wrote %v, want [12]", wrote)
	}
}

// TestDenialAfterAdmissionWritesNoGrant (review11 #10): a request
// admitted on a kept yes reached remember after a denial of the same
// caller and scope had taken the grant back, and wrote it again.
func TestDenialAfterAdmissionWritesNoGrant(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	got := grantOther(t, c)
	// Served again, on the yes kept, the grant now out of memory (as after
	// a restart, or its stream's end): Recorded is asked once before the
	// admission and once after; the denial comes between, as another
	// request of the caller, denied, would bring it.
	c.mu.Lock()
	clear(c.grants)
	c.mu.Unlock()
	var asked atomic.Int32
	c.Recorded = func(id string) bool {
		if id == other.Key() && asked.Add(1) == 2 {
			c.forget(parse(t, listRV0, other))
		}
		return true
	}
	ask(t, c, other, listRV0, nil)
	if asked.Load() < 2 {
		t.Fatalf("Recorded asked %d times, the test's premise is gone", asked.Load())
	}
	if want := []string{"put 10", "delete"}; !slices.Equal(got(), want) {
		t.Errorf("a denial between the admission and the grant: %v, want %v", got(), want)
	}
	// The caller's next request, admitted after the denial, writes again.
	c.Recorded = nil
	if !ask(t, c, other, listRV0, nil) {
		t.Fatal("not served")
	}
	if want := []string{"put 10", "delete", "put 10"}; !slices.Equal(got(), want) {
		t.Errorf("admitted after the denial: %v, want %v", got(), want)
	}
}

// TestEndedGrantsLeaveMemory (review12 #7): every (identity, scope) ever
// granted stayed in memory, walked at every period; now a grant leaves
// once its stream ended and no watch follows it, its pin written first,
// and the stored grant stays (nothing deletes it).
func TestEndedGrantsLeaveMemory(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api, func(c *Cache) { c.Idle = 50 * time.Millisecond })
	got := grantOther(t, c)
	k := grantKey{other.Key(), scopeOf(parse(t, listRV0, other))}
	wctx, endWatch := context.WithCancel(context.Background())
	served := watchAsOther(wctx, c, httptest.NewRecorder())
	waitUntil(t, "watched", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.grants[k] != nil && c.grants[k].watches == 1
	})
	api.events <- `{"type":"MODIFIED","object":` + cm("a", "12") + `}`
	waitUntil(t, "sent 12", func() bool { return c.pendingOf(k) >= 12 })
	c.writePins()
	c.mu.Lock()
	held := c.grants[k] != nil
	c.mu.Unlock()
	if !held {
		t.Fatal("a grant a watch follows left memory")
	}
	endWatch()
	if !<-served {
		t.Fatal("the watch was not served")
	}
	api.events <- `{"type":"MODIFIED","object":` + cm("a", "13") + `}`
	c.mu.Lock()
	st := c.grants[k].st
	c.mu.Unlock()
	waitUntil(t, "idle, ended", func() bool { return isClosed(st.endedCh) })
	c.writePins()
	c.mu.Lock()
	n := len(c.grants)
	c.mu.Unlock()
	if n != 0 {
		t.Errorf("%d grants in memory, their stream ended and no watch open; want none", n)
	}
	if want := []string{"put 10", "put 12"}; !slices.Equal(got(), want) {
		t.Errorf("Grant told %v, want %v (the pin written, the grant kept in the store)", got(), want)
	}
}

// TestReviewsIndexedByScope: the answers kept for a user and scope are
// found, and dropped, by the index, as by the reviews themselves.
func TestReviewsIndexedByScope(t *testing.T) {
	c := &Cache{Log: newTestStream(1).c.Log}
	c.init()
	scope := store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns"}
	done := make(chan struct{})
	close(done)
	at := time.Now()
	for _, tok := range []string{"t1", "t2"} {
		for _, verb := range []string{"list", "watch"} {
			c.keepReview(reviewKey{user: "u", token: tok, verb: verb, scope: scope}, &review{done: done, verdict: allowed, at: at})
		}
	}
	c.keepReview(reviewKey{user: "v", token: "t", verb: "list", scope: scope}, &review{done: done, verdict: allowed, at: at})
	if !c.reviewedSince("u", scope, at) || c.reviewedSince("u", scope, at.Add(time.Second)) || c.reviewedSince("w", scope, at) {
		t.Error("reviewedSince answers other than the kept answers say")
	}
	c.mu.Lock()
	c.dropAnswers("u", scope, reviewKey{})
	n, m := len(c.reviews), len(c.answers)
	c.mu.Unlock()
	if c.reviewedSince("u", scope, at) || !c.reviewedSince("v", scope, at) || n != 1 || m != 1 {
		t.Errorf("after u's answers were dropped: %d reviews, %d indexed scopes; want v's one", n, m)
	}
}

// gatedWriter is a client that stops reading once blocked, until gate is
// closed.
type gatedWriter struct {
	h       http.Header
	blocked atomic.Bool
	gate    chan struct{}
}

func (w *gatedWriter) Header() http.Header { return w.h }
func (w *gatedWriter) WriteHeader(int)     {}
func (w *gatedWriter) Flush()              {}
func (w *gatedWriter) Write(b []byte) (int, error) {
	if w.blocked.Load() {
		<-w.gate
	}
	return len(b), nil
}

// TestPinCoversOnlyWhatWasWritten (review12 #8): a grant and its pin were
// written before the request was served, which could still go upstream;
// and a watched grant's pin moved to the stream's version, whatever the
// watch had written.
func TestPinCoversOnlyWhatWasWritten(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	got := logGrants(c)
	if !ask(t, c, token, listRV0, nil) {
		t.Fatal("not served")
	}
	// Newer than the stream: the apiserver answers, and no grant is written.
	if ask(t, c, other, "/api/v1/namespaces/ns/configmaps?resourceVersion=99&resourceVersionMatch=NotOlderThan", nil) {
		t.Fatal("served a version the stream has not seen")
	}
	if g := got(); len(g) != 0 {
		t.Fatalf("a request sent upstream wrote %v", g)
	}
	// A watch whose client stops reading: its pin stays at what it was
	// written.
	w := &gatedWriter{h: http.Header{}, gate: make(chan struct{})}
	w.blocked.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := watchAsOther(ctx, c, w)
	k := grantKey{other.Key(), scopeOf(parse(t, listRV0, other))}
	waitUntil(t, "granted", func() bool { return len(got()) == 1 })
	c.mu.Lock()
	st := c.streams[k.asked]
	c.mu.Unlock()
	api.events <- `{"type":"MODIFIED","object":` + cm("a", "12") + `}`
	api.events <- `{"type":"MODIFIED","object":` + cm("b", "13") + `}`
	waitUntil(t, "at 13", func() bool { return st.version() >= 13 })
	c.writePins()
	if want := []string{"put 10"}; !slices.Equal(got(), want) {
		t.Errorf("nothing written past 10 to the watch: Grant told %v, want %v", got(), want)
	}
	close(w.gate)
	waitUntil(t, "written 13", func() bool { return c.pendingOf(k) >= 13 })
	c.writePins()
	if want := []string{"put 10", "put 13"}; !slices.Equal(got(), want) {
		t.Errorf("written up to 13: Grant told %v, want %v", got(), want)
	}
	cancel()
	if !<-served {
		t.Fatal("the watch was not served")
	}
}
