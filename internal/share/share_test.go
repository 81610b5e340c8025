package share

import (
	"io"
	"log/slog"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

func parse(t *testing.T, target string, id request.Identity) *request.Info {
	t.Helper()
	r := httptest.NewRequest("GET", target, nil)
	r.Header.Set("Accept", "application/vnd.kubernetes.protobuf, application/json")
	info, err := request.Parse(r, id)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

var node = request.Identity{Kind: request.NodeCert, User: "system:node:edge-1"}

func TestShareable(t *testing.T) {
	for _, c := range []struct {
		target string
		id     request.Identity
		want   bool
	}{
		{"/api/v1/pods?resourceVersion=0", node, true},
		{"/api/v1/pods?resourceVersion=0&limit=500", node, true},
		{"/api/v1/pods?resourceVersion=12&resourceVersionMatch=NotOlderThan", node, true},
		{"/api/v1/pods?resourceVersion=12&resourceVersionMatch=NotOlderThan&limit=5", node, false},
		{"/api/v1/pods", node, false}, // consistent: upstream
		{"/api/v1/pods?resourceVersion=12&resourceVersionMatch=Exact", node, false},
		{"/api/v1/pods?resourceVersion=0&continue=abc", node, false},
		{"/api/v1/pods?watch=true&resourceVersion=12", node, true},
		{"/api/v1/pods?watch=true", node, true},
		{"/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true", node, true},
		{"/api/v1/pods?watch=true&sendInitialEvents=true", node, false}, // the apiserver says what is wrong
		{"/api/v1/pods?watch=true&resourceVersion=abc", node, false},
		{"/api/v1/namespaces/a/pods/p?resourceVersion=0", node, false}, // GET
		{"/api/v1/namespaces/a/configmaps?watch=true&fieldSelector=metadata.name%3Dcm&resourceVersion=5", node, true},
		{"/api/v1/namespaces/a/configmaps/cm?watch=true&resourceVersion=5", node, false}, // one object by its path
		{"/api/v1/watch/pods?resourceVersion=12", node, false},                           // the legacy path
		{"/api/v1/pods?resourceVersion=0", request.Identity{}, false},                    // anonymous
		{"/api/v1/pods?watch=true&labelSelector=a%3D%3D%3D", node, false},                // invalid selector
		{"/api/v1/namespaces/a/pods/p/log?resourceVersion=0", node, false},               // subresource
	} {
		if got := shareable(parse(t, c.target, c.id)); got != c.want {
			t.Errorf("%s: shareable %v, want %v", c.target, got, c.want)
		}
	}
}

func TestCovers(t *testing.T) {
	for _, c := range []struct {
		stream, want string
		ok           bool
	}{
		{"/api/v1/configmaps", "/api/v1/namespaces/a/configmaps", true},
		{"/api/v1/services", "/api/v1/services?labelSelector=%21service.kubernetes.io%2Fheadless", true},
		{"/api/v1/nodes", "/api/v1/nodes?fieldSelector=metadata.name%3Dedge-1", true},
		{"/api/v1/pods", "/api/v1/pods?fieldSelector=spec.nodeName%3Dedge-1", false}, // a field outpost does not evaluate here
		{"/api/v1/namespaces/a/configmaps", "/api/v1/configmaps", false},
		{"/api/v1/namespaces/a/configmaps", "/api/v1/namespaces/b/configmaps", false},
		{"/api/v1/services?labelSelector=a%3Db", "/api/v1/services", false},
		{"/api/v1/services?labelSelector=a%3Db", "/api/v1/services?labelSelector=a%3Dc", false},
		{"/api/v1/configmaps", "/api/v1/secrets", false},
		{"/api/v1/configmaps", "/api/v1/configmaps", false}, // the same scope is not "covered"
	} {
		k := scopeOf(parse(t, c.stream+sep(c.stream)+"resourceVersion=0", node))
		want := parse(t, c.want+sep(c.want)+"resourceVersion=0", node)
		if _, ok := covers(k, scopeOf(want), want); ok != c.ok {
			t.Errorf("stream %s covers %s: %v, want %v", c.stream, c.want, ok, c.ok)
		}
	}
}

func sep(s string) string {
	if slices.Contains([]byte(s), '?') {
		return "&"
	}
	return "?"
}

func obj(ns, name, rv string, lbls map[string]string) store.Object {
	return store.Object{Namespace: ns, Name: name, ResourceVersion: rv, Labels: lbls, Data: []byte(`{"metadata":{"name":"` + name + `"}}`)}
}

// TestFilteredEvents checks what a watch served from a broader stream
// sees as objects enter and leave its selection.
func TestFilteredEvents(t *testing.T) {
	f := filter{on: true, namespace: "a", labels: labels.SelectorFromSet(labels.Set{"tier": "front"}), fields: fields.Everything()}
	front, back := map[string]string{"tier": "front"}, map[string]string{"tier": "back"}
	in, out, other := obj("a", "x", "2", front), obj("a", "x", "2", back), obj("b", "x", "2", front)
	for _, c := range []struct {
		name string
		e    event
		typ  watch.EventType
		keep bool
	}{
		{"added in", event{typ: watch.Added, obj: in}, watch.Added, true},
		{"added out", event{typ: watch.Added, obj: out}, "", false},
		{"added elsewhere", event{typ: watch.Added, obj: other}, "", false},
		{"stays in", event{typ: watch.Modified, obj: in, prev: &in}, watch.Modified, true},
		{"enters", event{typ: watch.Modified, obj: in, prev: &out}, watch.Added, true},
		{"leaves", event{typ: watch.Modified, obj: out, prev: &in}, watch.Deleted, true},
		{"stays out", event{typ: watch.Modified, obj: out, prev: &out}, "", false},
		{"deleted in", event{typ: watch.Deleted, obj: in, prev: &in}, watch.Deleted, true},
		{"deleted out", event{typ: watch.Deleted, obj: out, prev: &out}, "", false},
	} {
		typ, _, keep := f.event(c.e)
		if keep != c.keep || (keep && typ != c.typ) {
			t.Errorf("%s: %s %v, want %s %v", c.name, typ, keep, c.typ, c.keep)
		}
	}
	if typ, _, keep := (filter{}).event(event{typ: watch.Modified, obj: out}); !keep || typ != watch.Modified {
		t.Errorf("unfiltered: %s %v", typ, keep)
	}
}

func newTestStream(window int) *stream {
	c := &Cache{Window: window, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	c.init()
	return newStream(c, store.ViewKey{Resource: "/v1/configmaps"}, "u")
}

func list(rv string, objs ...store.Object) codec.List {
	return codec.List{Kind: "ConfigMapList", APIVersion: "v1", ResourceVersion: rv, Items: objs}
}

func logOf(s *stream, from uint64) []string {
	evs, _, _, _, _, _ := s.events(from)
	var out []string
	for _, e := range evs {
		out = append(out, string(e.typ)+" "+e.obj.Name+" "+e.obj.ResourceVersion)
	}
	return out
}

// TestRelistSendsDifferences checks that a list after the first reaches
// watches as events: deletions first, then the rest by resourceVersion,
// so that a watch never has to list again.
func TestRelistSendsDifferences(t *testing.T) {
	s := newTestStream(100)
	if err := s.replace(list("10", obj("", "keep", "3", nil), obj("", "change", "4", nil), obj("", "gone", "5", nil)), 10); err != nil {
		t.Fatal(err)
	}
	next, ok := s.since(10)
	if !ok {
		t.Fatal("the list's own version is not covered")
	}
	if err := s.replace(list("20", obj("", "keep", "3", nil), obj("", "change", "15", nil), obj("", "new", "12", nil)), 20); err != nil {
		t.Fatal(err)
	}
	want := []string{"DELETED gone 5", "ADDED new 12", "MODIFIED change 15", "BOOKMARK  "}
	if got := logOf(s, next); !slices.Equal(got, want) {
		t.Fatalf("differences %v, want %v", got, want)
	}
	// A watch that got the bookmark resumes from it, and gets nothing again.
	if again, ok := s.since(20); !ok || len(logOf(s, again)) != 0 {
		t.Fatalf("resuming from the bookmark's version: %v %v", ok, logOf(s, again))
	}
	if _, ok := s.since(9); ok {
		t.Fatal("a version before the first list is covered")
	}
	snap := s.snapshot(filter{})
	if snap.rv != 20 || len(snap.objs) != 3 || snap.objs[0].Name != "change" || snap.objs[2].Name != "new" {
		t.Fatalf("snapshot at %d: %v", snap.rv, snap.objs)
	}
}

// TestWindow checks that events past the window are dropped, a watch from
// before them gets 410, and a watch that fell behind them is told so.
func TestWindow(t *testing.T) {
	s := newTestStream(3)
	if err := s.replace(list("10"), 10); err != nil {
		t.Fatal(err)
	}
	start, _ := s.since(10)
	for i := 11; i <= 15; i++ {
		rv := string(rune('0'+i/10)) + string(rune('0'+i%10))
		if err := s.apply(codec.Event{Type: watch.Added, Object: obj("", "o"+rv, rv, nil)}); err != nil {
			t.Fatal(err)
		}
	}
	// A replayed event is not applied twice.
	if err := s.apply(codec.Event{Type: watch.Added, Object: obj("", "o15", "15", nil)}); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.since(11); ok {
		t.Fatal("version 11 is covered after its event was dropped")
	}
	next, ok := s.since(12)
	if !ok {
		t.Fatal("version 12 is not covered")
	}
	if got, want := logOf(s, next), []string{"ADDED o13 13", "ADDED o14 14", "ADDED o15 15"}; !slices.Equal(got, want) {
		t.Fatalf("events after 12: %v, want %v", got, want)
	}
	if _, _, _, _, _, ok := s.events(start); ok {
		t.Fatal("a watch behind the window was not told")
	}
	if s.bytes <= 0 || s.c.bytes.Load() != s.bytes {
		t.Fatalf("stream holds %d bytes, the cache counts %d", s.bytes, s.c.bytes.Load())
	}
}

// TestEncodedListKeptUntilChange checks that a whole answer is shared by
// the clients asking until the stream changes, and never answers one
// asking for a newer version.
func TestEncodedListKeptUntilChange(t *testing.T) {
	s := newTestStream(10)
	if err := s.replace(list("10", obj("", "a", "3", nil)), 10); err != nil {
		t.Fatal(err)
	}
	snap := s.snapshot(filter{})
	s.keepEncoded("json", encodedList{gen: snap.gen, rv: snap.rv, body: []byte("answer")})
	if e, ok := s.encoded("json", 0); !ok || string(e.body) != "answer" {
		t.Fatalf("kept answer: %q %v", e.body, ok)
	}
	if _, ok := s.encoded("json", 11); ok {
		t.Fatal("an answer at 10 was given for NotOlderThan 11")
	}
	if _, ok := s.encoded("protobuf", 0); ok {
		t.Fatal("an answer was given in another media type")
	}
	s.progress(12) // a bookmark changes no object
	if _, ok := s.encoded("json", 0); !ok {
		t.Fatal("a bookmark dropped the kept answer")
	}
	if err := s.apply(codec.Event{Type: watch.Modified, Object: obj("", "a", "13", nil)}); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.encoded("json", 0); ok {
		t.Fatal("an answer was kept after the stream changed")
	}
	// One encoded before the change is not kept after it.
	s.keepEncoded("json", encodedList{gen: snap.gen, rv: snap.rv, body: []byte("old")})
	if _, ok := s.encoded("json", 0); ok {
		t.Fatal("an answer of an older generation was kept")
	}
}

// TestOldEventsDropped checks that events older than ringAge go, even
// below the window, and that a watch from before them gets 410.
func TestOldEventsDropped(t *testing.T) {
	s := newTestStream(100)
	if err := s.replace(list("10"), 10); err != nil {
		t.Fatal(err)
	}
	for _, rv := range []string{"11", "12"} {
		if err := s.apply(codec.Event{Type: watch.Added, Object: obj("", "o"+rv, rv, nil)}); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	s.ring[0].at = time.Now().Add(-ringAge - time.Second)
	s.mu.Unlock()
	if err := s.apply(codec.Event{Type: watch.Added, Object: obj("", "o13", "13", nil)}); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.since(10); ok {
		t.Fatal("version 10 is covered after its next event aged out")
	}
	next, ok := s.since(11)
	if got := logOf(s, next); !ok || len(got) != 2 {
		t.Fatalf("events after 11: %v %v", got, ok)
	}
	if s.bytes != heldBytes(s) {
		t.Fatalf("counts %d bytes, holds %d", s.bytes, heldBytes(s))
	}
}

// TestResumable checks the guess whether the apiserver still has a broken
// stream's version: always within its 75 s; later only for a whole
// resource seen quiet enough that fewer than half of the 100 events the
// apiserver keeps at least came meanwhile.
func TestResumable(t *testing.T) {
	now := time.Now()
	brokeAt := now.Add(-2 * time.Minute)
	quiet := newTestStream(4096)
	quiet.syncedAt = now.Add(-4 * time.Hour)
	busy := newTestStream(4096)
	busy.syncedAt = quiet.syncedAt
	for i := range 300 { // 2 a second in the 150 s before the break
		busy.ring = append(busy.ring, event{typ: watch.Modified, at: brokeAt.Add(-time.Duration(i) * 500 * time.Millisecond)})
	}
	// Events long before the break, and bookmarks, say nothing of the rate.
	for i := range 300 {
		quiet.ring = append(quiet.ring, event{typ: watch.Modified, at: brokeAt.Add(-5*time.Minute - time.Duration(i)*time.Second)})
		quiet.ring = append(quiet.ring, event{typ: watch.Bookmark, at: brokeAt.Add(-time.Duration(i) * 100 * time.Millisecond)})
	}
	young := newTestStream(4096)
	young.syncedAt = brokeAt.Add(-2 * time.Second)
	narrow := newTestStream(4096)
	narrow.scope.Namespace = "ns"
	narrow.syncedAt = quiet.syncedAt
	for _, tc := range []struct {
		name    string
		s       *stream
		brokeAt time.Time
		want    bool
	}{
		{"busy, away 60s", busy, now.Add(-60 * time.Second), true},
		{"narrow, away 60s", narrow, now.Add(-60 * time.Second), true},
		{"quiet, away 2m", quiet, brokeAt, true},
		{"quiet, away 3h", quiet, now.Add(-3 * time.Hour), false},
		{"busy, away 2m", busy, brokeAt, false},
		{"synced 2s before, away 2m", young, brokeAt, false},
		{"one namespace, quiet, away 2m", narrow, brokeAt, false},
	} {
		if got := tc.s.resumable(tc.brokeAt, now); got != tc.want {
			t.Errorf("%s: resumable %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestRecheckPeriodSpread: watches begun together were asked again in the
// same second, every half recheck period; the period is now 40–50% of it.
func TestRecheckPeriodSpread(t *testing.T) {
	seen := map[time.Duration]bool{}
	for range 100 {
		d := recheckPeriod(5 * time.Minute)
		if d < 2*time.Minute || d > 150*time.Second {
			t.Fatalf("period %v, want 2m–2m30s", d)
		}
		seen[d.Round(time.Second)] = true
	}
	if len(seen) < 10 {
		t.Errorf("100 periods took %d values", len(seen))
	}
	if d := recheckPeriod(time.Nanosecond); d <= 0 {
		t.Errorf("a recheck of 1ns: period %v", d)
	}
}
