package recorder

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/outposthq/outpost/internal/store"
)

// roundTripFunc answers requests with a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func configMapList(rv string, names ...string) *http.Response {
	var items []string
	for i, n := range names {
		items = append(items, fmt.Sprintf(`{"metadata":{"name":%q,"namespace":"chaos","resourceVersion":"%d"}}`, n, i+1))
	}
	body := fmt.Sprintf(`{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":%q},"items":[%s]}`, rv, strings.Join(items, ","))
	return &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {"application/json"}}, Body: io.NopCloser(strings.NewReader(body))}
}

// members is what view k holds, by name, and its resourceVersion.
func members(t *testing.T, st *store.Store, k store.ViewKey) (names []string, rv string) {
	t.Helper()
	v, _, err := st.View(k)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.List(k, "", 0, func(o store.Object) error {
		names = append(names, o.Name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return names, v.ResourceVersion
}

// TestRelistKeepsWatchEvents: the refresher re-lists a view a watch keeps
// recording into (a stream of the node watch cache). An event the watch
// delivers while the list is on its way, newer than the list, must not be
// undone by the list: the object deleted stays deleted.
func TestRelistKeepsWatchEvents(t *testing.T) {
	st := openStore(t)
	c := &Recorder{Store: st, Log: slog.New(slog.DiscardHandler), BatchDelay: time.Millisecond}
	c.init()
	runRecorder(t, c)
	k := store.ViewKey{Identity: "reader", Resource: "/v1/configmaps", Namespace: "chaos"}
	waitFor := func(d time.Duration, ok func() bool) bool {
		t.Helper()
		for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
			if ok() {
				return true
			}
		}
		return false
	}

	// The view, listed at 10.
	if _, err := c.relistOne(t.Context(), k, roundTripFunc(func(*http.Request) (*http.Response, error) {
		return configMapList("10", "a", "b"), nil
	})); err != nil {
		t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool { _, rv := members(t, st, k); return rv == "10" }) {
		t.Fatal("the first list was not recorded")
	}

	// A watch recording into it, read by its client as it comes.
	src, feed := io.Pipe()
	resp := &http.Response{StatusCode: http.StatusOK, Body: src}
	c.teeWatch(resp, k, "application/json", false)
	go func() { _, _ = io.Copy(io.Discard, resp.Body) }()
	defer feed.Close()
	send := func(typ, name, rv string) {
		t.Helper()
		if _, err := fmt.Fprintf(feed, `{"type":%q,"object":{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":%q,"namespace":"chaos","resourceVersion":%q}}}`+"\n", typ, name, rv); err != nil {
			t.Fatal(err)
		}
	}

	// The re-list, asked at 15; before its answer comes, the watch says b
	// was deleted at 20.
	if _, err := c.relistOne(t.Context(), k, roundTripFunc(func(*http.Request) (*http.Response, error) {
		send("DELETED", "b", "20")
		// Recorded at once unless held for the list (then this waits
		// in vain, briefly).
		waitFor(time.Second, func() bool { names, _ := members(t, st, k); return !slices.Contains(names, "b") })
		return configMapList("15", "a", "b"), nil
	})); err != nil {
		t.Fatal(err)
	}
	send("BOOKMARK", "", "21")
	if !waitFor(5*time.Second, func() bool { _, rv := members(t, st, k); return rv == "21" }) {
		names, rv := members(t, st, k)
		t.Fatalf("the watch's events after the re-list were not recorded: view at %s holds %v", rv, names)
	}
	if names, rv := members(t, st, k); !slices.Equal(names, []string{"a"}) {
		t.Errorf("view at %s holds %v, want [a]: the re-list undid the deletion its watch recorded", rv, names)
	}
}

// TestLostViewsFetchedAgain: views a rebuild of the store dropped are
// fetched again at once when the link is up; when it is not, by the next
// re-list of their identity, even when something else keeps them fresh
// (a stream of the node watch cache, which would not list them again).
func TestLostViewsFetchedAgain(t *testing.T) {
	st := openStore(t)
	up := make(chan bool, 1)
	up <- true
	asked := make(chan string, 16)
	link := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		online := <-up
		up <- online
		if !online {
			return nil, fmt.Errorf("link down")
		}
		asked <- r.URL.Path
		return configMapList("30", "a", "b"), nil
	})
	c := &Recorder{Store: st, Log: slog.New(slog.DiscardHandler), BatchDelay: time.Millisecond,
		UpstreamAs: func(string) http.RoundTripper { return link },
		KeptFresh:  func(store.ViewKey) bool { return true }}
	c.init()
	runRecorder(t, c)
	waitFor := func(k store.ViewKey) {
		t.Helper()
		for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
			if names, rv := members(t, st, k); rv == "30" && slices.Equal(names, []string{"a", "b"}) {
				return
			}
		}
		t.Fatalf("view %s was not fetched again", k)
	}

	online := store.ViewKey{Identity: "node", Resource: "/v1/configmaps", Namespace: "chaos"}
	c.Lost(store.Loss{Views: []store.ViewKey{online}})
	waitFor(online)

	<-up
	up <- false
	offline := store.ViewKey{Identity: "node", Resource: "/v1/configmaps", Namespace: "other"}
	c.Lost(store.Loss{Views: []store.ViewKey{offline}})
	// The refresher's attempt fails; the view waits for the reconnect.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		c.mu.Lock()
		queued := c.refreshing[offline]
		c.mu.Unlock()
		if !queued {
			break
		}
	}
	if _, ok, _ := st.View(offline); ok {
		t.Fatal("fetched while the link was down")
	}
	<-up
	up <- true
	for len(asked) > 0 {
		<-asked
	}
	// The reconnect's re-list: the online view was listed after since and
	// is kept fresh, so only the lost one is asked.
	n, err := c.Relist(t.Context(), "node", 100, link, time.Now().Add(-time.Hour))
	if err != nil || n != 1 {
		t.Fatalf("Relist: %d views, %v; want 1", n, err)
	}
	waitFor(offline)
	if got := <-asked; got != "/api/v1/namespaces/other/configmaps" {
		t.Errorf("re-listed %s", got)
	}
	if n, _ := c.Relist(t.Context(), "node", 100, link, time.Now().Add(-time.Hour)); n != 0 {
		t.Errorf("the next re-list asked %d views again; the lost one was listed", n)
	}
}

// TestLostUnnamedAndRefused: when a rebuild lost views it cannot name,
// the views this recorder listed that the store no longer holds are
// fetched again; a lost view the apiserver now refuses is deleted and not
// asked for again.
func TestLostUnnamedAndRefused(t *testing.T) {
	st := openStore(t)
	refused := store.ViewKey{Identity: "node", Resource: "/v1/configmaps", Namespace: "gone"}
	asked := make(chan string, 16)
	link := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		asked <- r.URL.Path
		if strings.Contains(r.URL.Path, "/gone/") {
			return &http.Response{StatusCode: http.StatusForbidden, Body: io.NopCloser(strings.NewReader("{}"))}, nil
		}
		return configMapList("40", "a"), nil
	})
	c := &Recorder{Store: st, Log: slog.New(slog.DiscardHandler), BatchDelay: time.Millisecond,
		UpstreamAs: func(string) http.RoundTripper { return link }}
	c.init()
	runRecorder(t, c)
	held := store.ViewKey{Identity: "node", Resource: "/v1/configmaps", Namespace: "kept"}
	if _, err := c.relistOne(t.Context(), held, link); err != nil {
		t.Fatal(err)
	}
	<-asked
	wait := func(cond func() bool) bool {
		for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
			if cond() {
				return true
			}
		}
		return false
	}
	listedWhole := func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		_, ok := c.listed[held]
		return ok
	}
	if !wait(listedWhole) {
		t.Fatal("the first list was not recorded")
	}
	// A rebuild dropped it, and could not say which views it dropped.
	if err := st.DeleteView(held); err != nil {
		t.Fatal(err)
	}
	c.Lost(store.Loss{Unnamed: true, Views: []store.ViewKey{refused}})
	if !wait(func() bool { _, ok, _ := st.View(held); return ok }) {
		t.Fatal("a view the rebuild lost unnamed was not fetched again")
	}
	if !wait(func() bool { c.mu.Lock(); defer c.mu.Unlock(); return len(c.lost) == 0 }) {
		c.mu.Lock()
		still := fmt.Sprint(c.lost)
		c.mu.Unlock()
		t.Fatalf("still lost: %s", still)
	}
	for len(asked) > 0 {
		<-asked
	}
	if n, err := c.Relist(t.Context(), "node", 100, link, time.Now().Add(-time.Hour)); err != nil || len(asked) != n {
		t.Fatalf("Relist: %d, %v", n, err)
	}
	for len(asked) > 0 {
		if p := <-asked; strings.Contains(p, "/gone/") {
			t.Errorf("the refused view was asked for again: %s", p)
		}
	}
}

// TestStaleViewRelistedAfterItWasListed: a view a client listed whole
// after the reconnect, then marked stale (an answer for it was dropped; the
// recorder forgets the mark once it is in the store), is re-listed at its
// turn: only a view not stale is skipped for having been listed since.
func TestStaleViewRelistedAfterItWasListed(t *testing.T) {
	st := openStore(t)
	asked := 0
	link := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		asked++
		return &http.Response{StatusCode: http.StatusInternalServerError, Header: http.Header{}, Body: http.NoBody, Request: r}, nil
	})
	c := &Recorder{Store: st, Log: slog.New(slog.DiscardHandler), BatchDelay: time.Millisecond}
	c.init()
	k := store.ViewKey{Identity: "node", Resource: "/v1/configmaps", Namespace: "ns"}
	since := time.Now()
	if err := st.ReplaceView(store.View{Key: k, ResourceVersion: "5", Kind: "ConfigMapList", APIVersion: "v1"}, nil); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.listed[k] = time.Now() // a client re-listed it after the reconnect
	c.mu.Unlock()
	if err := st.MarkStale(k); err != nil { // then an answer was dropped (flushed: c.stale cleared)
		t.Fatal(err)
	}
	if v, _, _ := st.View(k); !v.Stale {
		t.Fatal("the view is not stale in the store")
	}
	if _, err := c.Relist(t.Context(), "node", 100, link, since); err != nil {
		t.Fatal(err)
	}
	if asked != 1 {
		t.Errorf("a view stale in the store was asked %d times; want once", asked)
	}
}

// openStore opens a store in a new directory, closed when the test ends.
func openStore(t *testing.T) *store.Store {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "store.db"), store.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st
}

// runRecorder runs c until the test ends.
func runRecorder(t *testing.T, c *Recorder) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
}
