package share

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// syncWriter is a ResponseWriter whose body can be read while written.
type syncWriter struct {
	mu   sync.Mutex
	h    http.Header
	body strings.Builder
}

func (w *syncWriter) Header() http.Header { return w.h }
func (w *syncWriter) WriteHeader(int)     {}
func (w *syncWriter) Flush()              {}
func (w *syncWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.body.Write(b)
}
func (w *syncWriter) String() string { w.mu.Lock(); defer w.mu.Unlock(); return w.body.String() }

// TestWatchAskedAgainAfterOutage: a watch served from another's stream
// stayed open through an outage, whose rechecks got no answer; back
// online, what changed was sent to it at once, though its last yes was
// older than Recheck and the apiserver now said no.
func TestWatchAskedAgainAfterOutage(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	var up atomic.Bool
	up.Store(true)
	c := &Cache{As: func(request.Identity) http.RoundTripper { return api }, UpstreamAs: func(string) http.RoundTripper { return api },
		Log: newTestStream(1).c.Log, Recheck: 2 * time.Second, Online: up.Load}
	runCtx, stop := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { _ = c.Run(runCtx); close(ran) }()
	defer func() { stop(); <-ran }()
	<-c.startedChan()
	if !ask(t, c, token, listRV0, nil) {
		t.Fatal("the owner was not served")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := &syncWriter{h: http.Header{}}
	go func() {
		r := httptest.NewRequest("GET", "/api/v1/namespaces/ns/configmaps?watch=true&resourceVersion=10", nil).WithContext(ctx)
		r.Header.Set("Accept", "application/json")
		info, _ := request.Parse(r, other)
		c.Serve(w, r, info)
	}()
	time.Sleep(100 * time.Millisecond)
	up.Store(false)
	time.Sleep(2500 * time.Millisecond) // longer than Recheck
	api.mu.Lock()
	api.allowed = false // revoked during the outage
	api.mu.Unlock()
	up.Store(true)
	api.events <- `{"type":"MODIFIED","object":` + cm("a", "99") + `}`
	time.Sleep(300 * time.Millisecond)
	if strings.Contains(w.String(), `"99"`) {
		t.Errorf("back from an outage longer than Recheck, a caller revoked meanwhile was sent the change before it was asked")
	}
}

// TestLeavingObjectSentAsItWas: an object leaving a watch's label
// selection was sent as DELETED with its new content, which the caller's
// selector (perhaps its authorization) excludes; kube-apiserver sends the
// previous content.
func TestLeavingObjectSentAsItWas(t *testing.T) {
	sel, _ := labels.Parse("team=a")
	f := filter{on: true, labels: sel, fields: fields.Everything()}
	prev := store.Object{Namespace: "ns", Name: "s", ResourceVersion: "10", Labels: map[string]string{"team": "a"}, Data: []byte(`{"data":"old-a"}`)}
	cur := store.Object{Namespace: "ns", Name: "s", ResourceVersion: "11", Labels: map[string]string{"team": "b"}, Data: []byte(`{"data":"new-b"}`)}
	typ, obj, keep := f.event(event{typ: watch.Modified, obj: cur, prev: &prev, rv: 11})
	if !keep || typ != watch.Deleted || string(obj.Data) != `{"data":"old-a"}` {
		t.Errorf("leaving the selection: %v %v %s, want DELETED of the previous content", typ, keep, obj.Data)
	}
}

// TestFlappingLinkStillReviewsGrants: each return of the link pushed the
// stored grants' review back by a whole delay, so a link that keeps
// dropping, the kind outpost is for, never had them reviewed.
func TestFlappingLinkStillReviewsGrants(t *testing.T) {
	var mu sync.Mutex
	up := true
	ch := make(chan struct{})
	reviewed := 0
	c := &Cache{Log: newTestStream(1).c.Log, Recheck: time.Second,
		Online:  func() bool { mu.Lock(); defer mu.Unlock(); return up },
		Changed: func() <-chan struct{} { mu.Lock(); defer mu.Unlock(); return ch },
		Grant:   func(string, store.ViewKey, store.ViewKey, uint64, bool) {},
		Grants: func(func(string, store.ViewKey) error) error {
			mu.Lock()
			reviewed++
			mu.Unlock()
			return nil
		}}
	c.init()
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { c.keepPins(ctx); close(stopped) }()
	// Down for 10 ms and back, every 200 ms, for 2 s.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		time.Sleep(190 * time.Millisecond)
		for _, v := range []bool{false, true} {
			mu.Lock()
			up = v
			close(ch)
			ch = make(chan struct{})
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}
	cancel()
	<-stopped
	mu.Lock()
	defer mu.Unlock()
	if reviewed == 0 {
		t.Errorf("online 95%% of 2 s (Recheck 1 s), the stored grants were never reviewed")
	}
}

// TestUnrecordedCallerGetsNoGrant: a caller --record-identities leaves
// out got a grant, and so was answered offline from another's view.
func TestUnrecordedCallerGetsNoGrant(t *testing.T) {
	api := &fakeAPIServer{allowed: true, events: make(chan string, 10)}
	c := newTestCache(t, api)
	grants := logGrants(c)
	c.Recorded = func(id string) bool { return id == token.User }
	if !ask(t, c, token, listRV0, nil) || !ask(t, c, other, listRV0, nil) {
		t.Fatal("not served")
	}
	if g := grants(); len(g) != 0 {
		t.Errorf("grants %v for a caller that is not recorded", g)
	}
}
