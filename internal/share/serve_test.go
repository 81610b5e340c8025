package share

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/outposthq/outpost/internal/codec"
	"github.com/outposthq/outpost/internal/metrics"
	"github.com/outposthq/outpost/internal/request"
	"github.com/outposthq/outpost/internal/store"
)

// These tests come from review10 of the watch cache: each failed before
// its fix.

// shortWriteTimeout makes clients that stop reading be let go within d,
// for the test.
func shortWriteTimeout(t *testing.T, d time.Duration) {
	old := writeTimeout
	writeTimeout = d
	t.Cleanup(func() { writeTimeout = old })
}

// bigStream is a synced stream of n ConfigMaps in namespace ns of 1 MiB
// each.
func bigStream(t *testing.T, n int) *stream {
	t.Helper()
	s := newTestStream(100)
	s.c.MaxBytes = 512 << 20
	pad := strings.Repeat("x", 1<<20)
	objs := make([]store.Object, 0, n)
	for i := range n {
		name := "o" + strconv.Itoa(1000+i)
		o := obj("ns", name, "3", nil)
		o.Data = []byte(`{"metadata":{"name":"` + name + `","namespace":"ns"},"data":{"p":"` + pad + `"}}`)
		objs = append(objs, o)
	}
	if err := s.replace(list("10", objs...), 10); err != nil {
		t.Fatal(err)
	}
	return s
}

// stalled is a client on a real connection that sends one request and
// never reads its answer; it returns when the handler returned, false
// when it did not within wait.
func stalled(t *testing.T, handler http.HandlerFunc, target string, wait time.Duration) (returnedAfter time.Duration, ok bool) {
	t.Helper()
	returned := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(returned)
		handler(w, r)
	}))
	defer srv.Close()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	if _, err := conn.Write([]byte("GET " + target + " HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-returned:
		return time.Since(start), true
	case <-time.After(wait):
		conn.Close() // lets the handler go, for srv.Close
		<-returned
		return time.Since(start), false
	}
}

// TestSlowListReaderHoldsNobody: a client that stops reading a large
// filtered list held the assembling budget while its answer was written,
// so that every other filtered list of the node waited; and it was never
// let go.
func TestSlowListReaderHoldsNobody(t *testing.T) {
	shortWriteTimeout(t, 2*time.Second)
	s := bigStream(t, 34) // more than the whole assembling budget
	f := filter{on: true, namespace: "ns", labels: labels.Everything(), fields: fields.Everything()}
	const target = "/api/v1/namespaces/ns/configmaps?resourceVersion=0"
	info := parse(t, target, token)
	info.Accept = codec.ParseAccept("application/json")

	second := make(chan bool, 1)
	after, ok := stalled(t, func(w http.ResponseWriter, r *http.Request) {
		s.use()
		writing := &firstWrite{ResponseWriter: w, start: make(chan struct{})}
		go func() {
			// Once the first client's answer is being written, which it
			// does not read.
			<-writing.start
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			w2 := httptest.NewRecorder()
			s.use()
			second <- s.c.serveList(w2, httptest.NewRequest("GET", target, nil).WithContext(ctx), info, s, f, nil) && w2.Body.Len() > 34<<20
		}()
		s.c.serveList(writing, r, info, s, f, nil)
	}, target, 10*time.Second)
	if !<-second {
		t.Error("a second client was not served within 1 s while the first did not read its list")
	}
	if !ok {
		t.Fatalf("a client that does not read its list still held its handler after %v (write timeout 2s)", after)
	}
	t.Logf("the list's handler returned %v after its client stopped reading (write timeout 2s)", after.Round(time.Millisecond))
}

// firstWrite closes start at the first Write.
type firstWrite struct {
	http.ResponseWriter
	start chan struct{}
	once  sync.Once
}

func (f *firstWrite) Write(b []byte) (int, error) {
	f.once.Do(func() { close(f.start) })
	return f.ResponseWriter.Write(b)
}

func (f *firstWrite) Unwrap() http.ResponseWriter { return f.ResponseWriter }

// TestInitialEventsWriteDeadline: a watch client that stops reading
// during its initial events was never let go (the write deadline covered
// only later events).
func TestInitialEventsWriteDeadline(t *testing.T) {
	shortWriteTimeout(t, 500*time.Millisecond)
	s := bigStream(t, 24) // more than the connection's buffers
	const target = "/api/v1/namespaces/ns/configmaps?watch=true&resourceVersion=0"
	info := parse(t, target, token)
	info.Accept = codec.ParseAccept("application/json")
	after, ok := stalled(t, func(w http.ResponseWriter, r *http.Request) {
		s.use()
		s.c.serveWatch(w, r, info, s, filter{}, nil)
	}, target, 10*time.Second)
	if !ok {
		t.Fatalf("a watch whose client stopped reading its initial events still held its handler after %v (write timeout 500ms)", after)
	}
	t.Logf("the watch's handler returned %v after its client stopped reading", after.Round(time.Millisecond))
	if s.users != 0 {
		t.Fatalf("the watch left %d users on the stream", s.users)
	}
}

// consistentAPI answers the consistent read of a consistent WatchList
// (LIST limit=1) at resourceVersion rv, or with code when it is set; and
// catchUp's metadata WatchList as the stream's owner with the lines of
// probe, then nothing until it ends.
type consistentAPI struct {
	mu     sync.Mutex
	rv     string
	code   int
	probe  []string
	asked  []string // "identity URL"
	accept []string
}

func (a *consistentAPI) as(id request.Identity) http.RoundTripper {
	return a.answer(id.Key())
}

func (a *consistentAPI) answer(who string) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		a.mu.Lock()
		defer a.mu.Unlock()
		a.asked = append(a.asked, who+" "+r.URL.RequestURI())
		a.accept = append(a.accept, r.Header.Get("Accept"))
		h := http.Header{"Content-Type": {"application/json"}}
		if r.URL.Query().Get("watch") == "true" {
			pr, pw := io.Pipe()
			go func() {
				for _, line := range a.probe {
					_, _ = pw.Write([]byte(line + "\n"))
				}
				<-r.Context().Done()
				pw.Close()
			}()
			return &http.Response{StatusCode: http.StatusOK, Header: h, Body: pr, Request: r}, nil
		}
		if a.code != 0 {
			body := `{"kind":"Status","apiVersion":"v1","status":"Failure","message":"configmaps is forbidden","code":403}`
			return &http.Response{StatusCode: a.code, Status: strconv.Itoa(a.code) + " Forbidden", Header: h, Body: io.NopCloser(strings.NewReader(body)), Request: r}, nil
		}
		body := `{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","metadata":{"resourceVersion":"` + a.rv + `","continue":"x"},"items":[]}`
		return &http.Response{StatusCode: http.StatusOK, Header: h, Body: io.NopCloser(strings.NewReader(body)), Request: r}, nil
	})
}

func (a *consistentAPI) seen() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.asked...)
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// upstreamCount is outpost_watchcache_upstream_requests_total{verb,code}.
func upstreamCount(t *testing.T, reg *prometheus.Registry, verb, code string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "outpost_watchcache_upstream_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, p := range m.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			if l["verb"] == verb && l["code"] == code {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

// TestConsistentWatchListIsFresh: a WatchList with resourceVersion ""
// was answered from the stream as it was, however far behind the
// apiserver it had fallen. It must reach the resourceVersion of a
// consistent read made as the caller within waitFresh, by itself or with
// catchUp (a quiet scope's stream hears of the cluster's newer versions
// only from the apiserver's bookmarks, once a minute: it compares what it
// holds with a metadata WatchList), or be left to the apiserver,
// unwritten.
func TestConsistentWatchListIsFresh(t *testing.T) {
	const target = "/api/v1/namespaces/ns/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&labelSelector=a%3Db"
	meta := func(name, rv string) string {
		return `{"type":"ADDED","object":{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{"name":"` + name + `","namespace":"ns","resourceVersion":"` + rv + `"}}}`
	}
	const end12 = `{"type":"BOOKMARK","object":{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{"resourceVersion":"12","annotations":{"k8s.io/initial-events-end":"true"}}}}`
	setup := func(api *consistentAPI) (*stream, *prometheus.Registry) {
		s := newTestStream(100)
		s.scope = store.ViewKey{Resource: "/v1/configmaps", Namespace: "ns"}
		s.path = "/api/v1/namespaces/ns/configmaps"
		reg := prometheus.NewRegistry()
		s.c.Metrics = metrics.New(reg)
		s.c.As = api.as
		s.c.UpstreamAs = func(owner string) http.RoundTripper { return api.answer("owner " + owner) }
		if err := s.replace(list("10", obj("ns", "a", "3", map[string]string{"a": "b"})), 10); err != nil {
			t.Fatal(err)
		}
		return s, reg
	}
	serve := func(s *stream, target string) (*httptest.ResponseRecorder, bool, time.Duration) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		info := parse(t, target, token)
		info.Accept = codec.ParseAccept("application/json")
		w := httptest.NewRecorder()
		s.use()
		start := time.Now()
		ok := s.c.serveWatch(w, httptest.NewRequest("GET", target, nil).WithContext(ctx), info, s, filter{}, nil)
		return w, ok, time.Since(start)
	}
	// endSoon ends s after d, as when it goes idle: its watches end.
	endSoon := func(s *stream, d time.Duration) {
		go func() {
			time.Sleep(d)
			s.mu.Lock()
			s.done = true
			s.changed()
			s.mu.Unlock()
		}()
	}
	initialEnd := `{"type":"BOOKMARK","object":{"kind":"ConfigMap","apiVersion":"v1","metadata":{"annotations":{"k8s.io/initial-events-end":"true"},"resourceVersion":"12"}}}`

	t.Run("first clients of a stream fetched consistently after they came", func(t *testing.T) {
		// As at a node's start: the WatchList waited for the stream's
		// first fetch, a consistent read sent after it arrived, so it
		// needs no read of the current version.
		for _, tc := range []struct {
			name       string
			sentBefore bool
			reads      int
		}{{"sent after", false, 0}, {"sent before", true, 1}} {
			api := &consistentAPI{rv: "10", probe: []string{meta("a", "3"), end12}}
			s, _ := setup(api)
			arrived := time.Now()
			s.consistentSent = arrived.Add(time.Millisecond)
			if tc.sentBefore {
				s.consistentSent = arrived.Add(-time.Millisecond)
			}
			endSoon(s, 500*time.Millisecond)
			ctx, cancel := context.WithTimeout(context.WithValue(context.Background(), arrivalKey{}, arrived), 10*time.Second)
			info := parse(t, target, token)
			info.Accept = codec.ParseAccept("application/json")
			s.use()
			ok := s.c.serveWatch(httptest.NewRecorder(), httptest.NewRequest("GET", target, nil).WithContext(ctx), info, s, filter{}, nil)
			cancel()
			reads := 0
			for _, r := range api.seen() {
				if strings.Contains(r, "limit=1") {
					reads++
				}
			}
			if !ok || reads != tc.reads {
				t.Errorf("%s: served %v, %d reads of the current version (want %d): %v", tc.name, ok, reads, tc.reads, api.seen())
			}
		}
	})
	t.Run("quiet scope", func(t *testing.T) {
		api := &consistentAPI{rv: "12", probe: []string{meta("a", "3"), end12}}
		s, reg := setup(api)
		endSoon(s, time.Second)
		w, ok, took := serve(s, target)
		if !ok || !strings.Contains(w.Body.String(), initialEnd) {
			t.Fatalf("served %v after %v: %s", ok, took, w.Body.String())
		}
		seen := api.seen()
		if len(seen) != 2 || seen[0] != token.Key()+" /api/v1/namespaces/ns/configmaps?labelSelector=a%3Db&limit=1" ||
			!strings.HasPrefix(api.accept[0], "application/json;as=PartialObjectMetadataList") ||
			seen[1] != "owner u /api/v1/namespaces/ns/configmaps?allowWatchBookmarks=true&resourceVersion=12&resourceVersionMatch=NotOlderThan&sendInitialEvents=true&watch=true" ||
			api.accept[1] != metaAccept {
			t.Fatalf("upstream saw %v, Accept %v", seen, api.accept)
		}
		if n := upstreamCount(t, reg, "current", "200"); n != 1 {
			t.Fatalf("counted %v consistent reads upstream, want 1", n)
		}
		if next, ok := s.since(12); !ok || len(logOf(s, next)) != 0 || s.rv != 12 {
			t.Fatalf("the stream is at %d, want 12 for every client", s.rv)
		}
	})
	t.Run("changed, the stream gets it", func(t *testing.T) {
		api := &consistentAPI{rv: "12", probe: []string{meta("a", "3"), meta("b", "11"), end12}}
		s, _ := setup(api)
		go func() {
			time.Sleep(300 * time.Millisecond)
			_ = s.apply(codec.Event{Type: watch.Added, Object: obj("ns", "b", "11", map[string]string{"a": "b"})})
		}()
		endSoon(s, time.Second)
		w, ok, took := serve(s, target)
		body := w.Body.String()
		if !ok || !strings.Contains(body, `"name":"b"`) || !strings.Contains(body, initialEnd) || strings.Index(body, `"name":"b"`) > strings.Index(body, initialEnd) {
			t.Fatalf("served %v after %v: %s", ok, took, body)
		}
	})
	t.Run("changed, the stream stays behind", func(t *testing.T) {
		api := &consistentAPI{rv: "12", probe: []string{meta("a", "3"), meta("b", "11"), end12}}
		s, _ := setup(api)
		w, ok, took := serve(s, target)
		if ok || w.Body.Len() != 0 || len(w.Header()) != 0 {
			t.Fatalf("a stream behind the apiserver answered a consistent WatchList (after %v): %v %s", took, w.Header(), w.Body.String())
		}
		if took < waitFresh {
			t.Fatalf("declined after %v, before waitFresh", took)
		}
	})
	t.Run("no answer", func(t *testing.T) {
		api := &consistentAPI{rv: "12"}
		s, _ := setup(api)
		w, ok, took := serve(s, target)
		if ok || w.Body.Len() != 0 {
			t.Fatalf("served %v after %v: %s", ok, took, w.Body.String())
		}
	})
	t.Run("consistent read refused", func(t *testing.T) {
		api := &consistentAPI{rv: "12", code: http.StatusForbidden}
		s, reg := setup(api)
		w, ok, took := serve(s, target)
		if ok || w.Body.Len() != 0 || took > time.Second {
			t.Fatalf("served %v after %v: %s", ok, took, w.Body.String())
		}
		if n := upstreamCount(t, reg, "current", "403"); n != 1 {
			t.Fatalf("counted %v refused consistent reads, want 1", n)
		}
	})
	t.Run("legacy watch from now", func(t *testing.T) {
		// The apiserver's cacher answers these from what it holds.
		api := &consistentAPI{rv: "12"}
		s, _ := setup(api)
		endSoon(s, 100*time.Millisecond)
		w, ok, _ := serve(s, "/api/v1/namespaces/ns/configmaps?watch=true")
		if !ok || !strings.Contains(w.Body.String(), `"name":"a"`) || len(api.seen()) != 0 {
			t.Fatalf("served %v, upstream saw %v: %s", ok, api.seen(), w.Body.String())
		}
	})
}

// TestProtobufOnlyClientGetsNoJSON: when protobuf could not be assembled
// for a client that also takes JSON, its JSON answer was kept as the
// protobuf one and given to the next client, which takes only protobuf.
func TestProtobufOnlyClientGetsNoJSON(t *testing.T) {
	s := newTestStream(10)
	s.scope.Resource = "example.com/v1/widgets"
	w1 := obj("", "w1", "3", nil)
	w1.Data = []byte(`{"kind":"Widget","apiVersion":"example.com/v1","metadata":{"name":"w1"}}`)
	if err := s.replace(codec.List{Kind: "WidgetList", APIVersion: "example.com/v1", ResourceVersion: "10", Items: []store.Object{w1}}, 10); err != nil {
		t.Fatal(err)
	}
	const target = "/apis/example.com/v1/widgets?resourceVersion=0"
	ask := func(accept string) (*httptest.ResponseRecorder, bool) {
		info := parse(t, target, node)
		info.Accept = codec.ParseAccept(accept)
		w := httptest.NewRecorder()
		s.use()
		return w, s.c.serveList(w, httptest.NewRequest("GET", target, nil), info, s, filter{}, nil)
	}
	if w, ok := ask("application/vnd.kubernetes.protobuf, application/json"); !ok || w.Header().Get("Content-Type") != codec.MediaJSON {
		t.Fatalf("a client taking protobuf or JSON: served %v as %q", ok, w.Header().Get("Content-Type"))
	}
	if w, ok := ask("application/vnd.kubernetes.protobuf"); ok && w.Header().Get("Content-Type") != codec.MediaProtobuf {
		t.Fatalf("a client taking only protobuf was answered %q: %.80s", w.Header().Get("Content-Type"), w.Body.String())
	}
	if w, ok := ask("application/json"); !ok || w.Header().Get("Content-Type") != codec.MediaJSON {
		t.Fatalf("a JSON client: served %v as %q", ok, w.Header().Get("Content-Type"))
	}
}

// TestDeleteOfUnheldObjectAdvances: a DELETED event for an object the
// stream did not hold left its resourceVersion behind, so a request
// NotOlderThan that version waited waitFresh and went upstream.
func TestDeleteOfUnheldObjectAdvances(t *testing.T) {
	s := newTestStream(10)
	if err := s.replace(list("10", obj("", "a", "3", nil)), 10); err != nil {
		t.Fatal(err)
	}
	next, _ := s.since(10)
	if err := s.apply(codec.Event{Type: watch.Deleted, Object: obj("", "never-held", "11", nil)}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if !s.waitRV(context.Background(), 11, time.Second) {
		t.Fatalf("the stream is not at 11 after the DELETED event at 11 (waited %v)", time.Since(start))
	}
	if got := logOf(s, next); len(got) != 0 {
		t.Fatalf("watches were sent %v for an object they never had", got)
	}
	if snap := s.snapshot(filter{}); len(snap.objs) != 1 || snap.rv != 11 {
		t.Fatalf("snapshot at %d of %d objects", snap.rv, len(snap.objs))
	}
}

// TestRefusalIsReadable: a refusal of the stream's request put the raw
// body in the error, which with protobuf is binary.
func TestRefusalIsReadable(t *testing.T) {
	st := &metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: metav1.StatusFailure, Code: 403, Reason: metav1.StatusReasonForbidden,
		Message: `configmaps is forbidden: User "system:serviceaccount:ns:nosy" cannot list resource "configmaps"`}
	proto, err := codec.EncodeProtobuf(st)
	if err != nil {
		t.Fatal(err)
	}
	want := `403 Forbidden: configmaps is forbidden: User "system:serviceaccount:ns:nosy" cannot list resource "configmaps"`
	for _, c := range []struct {
		name, contentType string
		body              []byte
		want              string
	}{
		{"protobuf", codec.MediaProtobuf, proto, want},
		{"json", "application/json", []byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","message":` + strconv.Quote(st.Message) + `,"code":403}`), want},
		{"not a Status", "text/html", []byte("<html>\x00\x01 proxy error</html>"), "403 Forbidden"},
	} {
		api := roundTripFunc(func(r *http.Request) (*http.Response, error) {
			return &http.Response{StatusCode: 403, Status: "403 Forbidden", Header: http.Header{"Content-Type": {c.contentType}},
				Body: io.NopCloser(strings.NewReader(string(c.body))), Request: r}, nil
		})
		s := newTestStream(10)
		s.c.UpstreamAs = func(string) http.RoundTripper { return api }
		_, err := s.upstream(context.Background(), nil, "application/json")
		if err == nil || err.Error() != c.want || !isAuthError(err) {
			t.Errorf("%s: error %q, want %q", c.name, err, c.want)
		}
	}
}

// TestTinyRecheckDoesNotPanic: a Recheck under 2ns (which config now
// refuses) panicked in the watch's recheck ticker.
func TestTinyRecheckDoesNotPanic(t *testing.T) {
	s := newTestStream(10)
	s.c.Recheck = time.Nanosecond
	s.c.As = func(request.Identity) http.RoundTripper { return denying{} }
	s.c.ctx = context.Background()
	if err := s.replace(list("10", obj("", "a", "3", nil)), 10); err != nil {
		t.Fatal(err)
	}
	info := parse(t, "/api/v1/configmaps?watch=true&resourceVersion=10", node)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	s.use()
	w := httptest.NewRecorder()
	s.c.serveWatch(w, httptest.NewRequest("GET", "/api/v1/configmaps?watch=true&resourceVersion=10", nil).WithContext(ctx), info, s, filter{}, nil)
	if w.Code != http.StatusOK {
		t.Fatalf("answer %d", w.Code)
	}
}
